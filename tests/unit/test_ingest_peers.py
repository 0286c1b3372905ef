"""``allowed_peers``: which peer addresses an ingest listener accepts."""

from __future__ import annotations

import pytest

from middleware.ingest.peers import PeerFilter, parse_networks


def test_addresses_and_networks_match_ipv4_ipv6_and_ipv4_mapped_peers() -> None:
    peers = PeerFilter(parse_networks(["10.20.0.0/16", "192.168.1.7", "fd00::/8"]))
    assert peers.allows("10.20.255.1")
    assert peers.allows("192.168.1.7")
    assert peers.allows("::ffff:10.20.0.5")  # a dual-stack listener sees IPv4 peers like this
    assert peers.allows("fd12::1%eth0")
    assert not peers.allows("10.21.0.1")
    assert not peers.allows("192.168.1.8")
    assert not peers.allows("::ffff:10.21.0.5")
    assert not peers.allows("not-an-address")


def test_no_networks_allows_every_peer() -> None:
    assert PeerFilter(()).allows("203.0.113.9")


def test_host_bits_are_allowed_in_a_network_entry() -> None:
    assert parse_networks(["10.1.2.3/24"])[0].with_prefixlen == "10.1.2.0/24"


@pytest.mark.parametrize("entry", ["10.0.0.300", "10.0.0.0/33", "example.org", ""])
def test_a_bad_entry_is_named_in_the_error(entry: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address or CIDR network"):
        parse_networks(["127.0.0.1", entry])

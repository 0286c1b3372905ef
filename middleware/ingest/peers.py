"""Which peers may connect to an ingest listener: ``allowed_peers`` as IP addresses and CIDR networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``["10.1.2.3", "192.168.0.0/24", "::1"]`` as networks; raises ValueError naming a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network (e.g. 10.0.0.0/24)") from None
    return tuple(networks)


class PeerFilter:
    """True for peers inside one of ``networks``; no networks: every peer."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks

    def allows(self, host: str) -> bool:
        """Whether the peer address ``host`` may connect (an unparsable address never may, if filtering)."""
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.5 on a dual-stack socket is 10.0.0.5
        return any(address in network for network in self.networks)

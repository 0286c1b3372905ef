"""`middleware validate` on transport settings: connector credentials, tls and oauth2 blocks, broker.tls."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from middleware.cli import app
from middleware.delivery import make_connector
from middleware.delivery.http import HttpConnector
from middleware.project import load_project
from middleware.tls import TlsOptions
from tests.project_copy import copy_project, edit, line_of, problems


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the shipped project with a throwaway CA and client certificate under certs/."""
    copy_project(tmp_path)
    (tmp_path / "certs").mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "certs" / "ca.pem"))
    ca.issue_cert("middleware-client").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "certs" /
                                                                                        "client.pem"))
    return tmp_path


CDR = "connectors/clinical-data-repository.yaml"


def test_credentials_in_url_beside_an_authorization_header_are_rejected_at_the_header_line(project: Path) -> None:
    path = project / CDR
    assert "Authorization: Bearer" in path.read_text()  # the shipped connector sends a header
    found = problems(project, {"CDR_URL": "https://svc:pa%2Fss@cdr.example.org/events"})
    assert found == [f"{CDR}:{line_of(path, 'Authorization:')}: url https://***@cdr.example.org/events carries "
                     "credentials (user:password@) and headers.Authorization sets them again: keep one of the two"]
    assert "pa%2Fss" not in found[0]


@pytest.mark.parametrize("password", ["pa/ss", "pa#ss", "pa?ss", "p/a#s?s@x"])
def test_credentials_with_any_characters_beside_an_authorization_header_are_rejected(project: Path,
                                                                                    password: str) -> None:
    found = problems(project, {"CDR_URL": f"https://svc:{password}@cdr.example.org/events"})
    assert len(found) == 1 and "carries credentials (user:password@)" in found[0]
    assert password not in found[0]


def test_validate_command_exits_1_naming_the_credentials_conflict(project: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDR_URL", "https://svc:pw@cdr.example.org/events")
    result = CliRunner().invoke(app, ["validate", "--project", str(project)])
    assert result.exit_code == 1
    assert f"{CDR}:{line_of(project / CDR, 'Authorization:')}: url https://***@cdr.example.org/events" in result.stdout


def test_credentials_in_url_alone_are_valid(project: Path) -> None:
    edit(project / CDR, "headers:\n  Authorization: Bearer ${CDR_TOKEN:-dev-token}\n", "")
    assert problems(project, {"CDR_URL": "https://svc:secret@cdr.example.org/events"}) == []


def test_oauth2_with_a_static_authorization_header_is_rejected(project: Path) -> None:
    path = project / CDR
    edit(path, "timeout: 10", "timeout: 10\noauth2:\n  token_url: https://idp.example.org/token\n"
                              "  client_id: middleware\n  client_secret: ${CDR_CLIENT_SECRET}")
    assert problems(project, {"CDR_CLIENT_SECRET": "s"}) == [
        f"{CDR}:{line_of(path, 'Authorization:')}: oauth2 sets the Authorization header: remove headers.Authorization"]


def test_oauth2_secret_comes_from_the_environment_and_reaches_the_connector(project: Path) -> None:
    path = project / CDR
    edit(path, "headers:\n  Authorization: Bearer ${CDR_TOKEN:-dev-token}\n",
         "oauth2:\n  token_url: https://idp.example.org/token\n  client_id: middleware\n"
         "  client_secret: ${CDR_CLIENT_SECRET}\n  scope: events.write\n  refresh_margin: 60\n")
    assert problems(project, {}) == [f"{CDR}:{line_of(path, 'client_secret')}: environment variable CDR_CLIENT_SECRET "
                                     "is not set (set it, or write ${CDR_CLIENT_SECRET:-default})"]
    loaded = load_project(project, {"CDR_CLIENT_SECRET": "from-env"})
    connector = make_connector(loaded.connectors["clinical-data-repository"])
    assert isinstance(connector, HttpConnector) and connector.tokens is not None
    credentials = connector.tokens.credentials
    assert credentials.client_secret == "from-env"
    assert (credentials.scope, credentials.refresh_margin) == ("events.write", 60)


def test_oauth2_missing_keys_and_unknown_client_auth(project: Path) -> None:
    path = project / CDR
    edit(path, "headers:\n  Authorization: Bearer ${CDR_TOKEN:-dev-token}\n",
         "oauth2:\n  token_url: https://idp.example.org/token\n  client_auth: jwt\n")
    found = problems(project)
    oauth_line = line_of(path, "oauth2:")
    assert f"{CDR}:{oauth_line}: missing key: 'client_id' in oauth2" in found
    assert f"{CDR}:{line_of(path, 'client_auth')}: oauth2.client_auth: 'jwt' is not one of: basic, post" in found


def test_connector_tls_files_resolve_against_the_project_and_missing_ones_are_reported(project: Path) -> None:
    path = project / CDR
    edit(path, "timeout: 10", "timeout: 10\ntls:\n  ca_file: certs/ca.pem\n  cert_file: certs/client.pem")
    loaded = load_project(project, {"CDR_URL": "https://cdr.example.org/events"})
    tls = loaded.connectors["clinical-data-repository"].options["tls"]
    assert tls == TlsOptions(ca_file=str(project / "certs" / "ca.pem"), cert_file=str(project / "certs" / "client.pem"))
    edit(path, "certs/ca.pem", "certs/nope.pem")
    assert problems(project, {"CDR_URL": "https://cdr.example.org/events"}) == [
        f"{CDR}:{line_of(path, 'ca_file')}: tls.ca_file: no such file {project / 'certs' / 'nope.pem'}"]


def test_connector_tls_on_plain_http_is_rejected(project: Path) -> None:
    path = project / CDR
    edit(path, "timeout: 10", "timeout: 10\ntls:\n  ca_file: certs/ca.pem")
    assert problems(project, {"CDR_URL": "http://cdr.example.org/events"}) == [
        f"{CDR}:{line_of(path, 'tls:')}: tls is set but url http://cdr.example.org/events is plain http://: use https://"]


def test_a_rejected_connector_does_not_also_report_its_routes(project: Path) -> None:
    found = problems(project, {"CDR_URL": "https://svc:pw@cdr.example.org/events"})
    assert len(found) == 1 and found[0].startswith(CDR)  # routes delivering to it are not flagged again


# -- broker.tls ------------------------------------------------------------------------------------

CONFIG = "config/middleware.yaml"
BROKER_TLS = ("  queue_prefix: \"\"\n  tls:\n    ca_file: certs/ca.pem\n    cert_file: certs/client.pem\n"
              "    verify: true\n")


def test_broker_tls_is_parsed_with_paths_resolved_against_the_project(project: Path) -> None:
    edit(project / CONFIG, "  queue_prefix: \"\"\n", BROKER_TLS)
    loaded = load_project(project, {"MIDDLEWARE_BROKER_URL": "amqps://guest:guest@rabbit.example.org:5671/"})
    assert loaded.settings.broker_tls == TlsOptions(ca_file=str(project / "certs" / "ca.pem"),
                                                    cert_file=str(project / "certs" / "client.pem"), verify=True)


def test_broker_tls_with_a_plain_amqp_url_is_rejected(project: Path) -> None:
    path = project / CONFIG
    edit(path, "  queue_prefix: \"\"\n", BROKER_TLS)
    assert problems(project, {"MIDDLEWARE_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}) == [
        f"{CONFIG}:{line_of(path, 'tls:')}: broker.tls is set but the broker URL is amqp:// (no TLS): "
        "use amqps:// in broker.url or MIDDLEWARE_BROKER_URL"]


def test_broker_tls_files_that_are_missing_or_not_pem_are_reported(project: Path) -> None:
    path = project / CONFIG
    (project / "certs" / "garbage.pem").write_text("not a certificate\n")
    edit(path, "  queue_prefix: \"\"\n", BROKER_TLS.replace("certs/ca.pem", "certs/garbage.pem")
         .replace("certs/client.pem", "certs/missing.pem"))
    found = problems(project, {"MIDDLEWARE_BROKER_URL": "amqps://rabbit.example.org/"})
    assert found == [f"{CONFIG}:{line_of(path, 'cert_file')}: broker.tls.cert_file: no such file "
                     f"{project / 'certs' / 'missing.pem'}"]
    edit(path, "certs/missing.pem", "certs/client.pem")
    [problem] = problems(project, {"MIDDLEWARE_BROKER_URL": "amqps://rabbit.example.org/"})
    assert problem.startswith(f"{CONFIG}:{line_of(path, 'cert_file')}: broker.tls.cert_file: cannot load the PEM files")


def test_broker_tls_key_without_certificate(project: Path) -> None:
    path = project / CONFIG
    edit(path, "  queue_prefix: \"\"\n", "  queue_prefix: \"\"\n  tls:\n    key_file: certs/client.pem\n")
    assert problems(project, {"MIDDLEWARE_BROKER_URL": "amqps://rabbit.example.org/"}) == [
        f"{CONFIG}:{line_of(path, 'key_file')}: broker.tls.key_file needs cert_file (the certificate it belongs to)"]

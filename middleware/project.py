"""Load config/, routes/, connectors/, schemas/ and config/lookups/ into one validated Project.

Every problem is collected (not only the first) as ``file:line: message``. The result is frozen
data: the hot path never re-reads YAML or rebuilds a validator.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as JsonSchemaError

from middleware import project_schema
from middleware.delivery.base import BreakerPolicy, ConnectorSpec, RetryPolicy, connector_problems
from middleware.delivery.outbound import Outbound, compile_map, compile_when
from middleware.durations import parse_duration
from middleware.errors import ConfigError, FilterError, MappingError, Problem
from middleware.formats import Unsplit, get_format
from middleware.fragments import Fragments
from middleware.ingest import FolderListener, HttpListener, HttpRateLimit, MllpListener, MllpTls, gateway_specs
from middleware.ingest.peers import parse_networks
from middleware.ingest.tls import server_context
from middleware.journal.config import JournalSettings, Sla
from middleware.mapcheck import check_map
from middleware.mapping import LookupTable, SpecError, compile_condition, compile_field
from middleware.observe import mask_secrets
from middleware.ordering import Ordering, ordering_problems
from middleware.route import DeliveryRule, EventRule, Route, subject_placeholders
from middleware.schemas import SchemaRegistry
from middleware.spec import components
from middleware.tls import TlsOptions
from middleware.tracing import TracingSettings, missing_problem
from middleware.tracing import settings_of as tracing_settings
from middleware.yamlfile import PathKey, YamlDoc, interpolate, load_yaml

DEFAULT_BROKER_URL = "filesystem://var/broker"


@dataclass(frozen=True)
class Settings:
    """Engine settings from config/middleware.yaml, after environment overrides."""

    broker_url: str = DEFAULT_BROKER_URL
    queue_prefix: str = ""
    broker_tls: TlsOptions | None = None  # broker.tls, used for amqps:// URLs
    prefetch: int = 20
    delivery_limit: int = 10
    timezone: str = "UTC"
    drain_timeout: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    ingest: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # ingest.<kind>[] listeners, by kind
    audit_path: Path = Path("var/audit.log")  # anchored to the project folder by the loader
    journal: JournalSettings = field(default_factory=JournalSettings)  # journal: (sqlite path anchored to the project)
    tracing: TracingSettings = field(default_factory=TracingSettings)  # tracing: OpenTelemetry spans (off)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def mllp(self) -> tuple[MllpListener, ...]:
        """``ingest.mllp[]``."""
        return tuple(self.ingest.get("mllp", ()))

    @property
    def http(self) -> tuple[HttpListener, ...]:
        """``ingest.http[]``."""
        return tuple(self.ingest.get("http", ()))


@dataclass(frozen=True)
class Project:
    """Everything a project declares, validated and compiled."""

    root: Path
    settings: Settings
    routes: Mapping[str, Route]
    connectors: Mapping[str, ConnectorSpec]
    schemas: SchemaRegistry
    lookups: Mapping[str, LookupTable] = field(default_factory=dict)

    def route(self, name_or_file: str) -> Route:
        """A route by name, or by the path of its YAML file; raises ``KeyError``."""
        if name_or_file in self.routes:
            return self.routes[name_or_file]
        wanted = Path(name_or_file).resolve()
        for route in self.routes.values():
            if Path(route.file).resolve() == wanted or (self.root / route.file).resolve() == wanted:
                return route
        raise KeyError(name_or_file)


def load_project(root: Path | str = ".", env: Mapping[str, str] | None = None, *, offline: bool = False) -> Project:
    """Load and validate the project in ``root``; raises :class:`ConfigError` with every problem.
    ``offline`` (``transform``, ``test``: nothing is delivered): a connector whose ``${VAR}`` is unset is
    left out instead of being a problem."""
    project, problems = check_project(root, env, offline=offline)
    if problems or project is None:
        raise ConfigError(problems)
    return project


def check_project(root: Path | str = ".", env: Mapping[str, str] | None = None, *,
                  offline: bool = False) -> tuple[Project | None, list[Problem]]:
    """Load the project and return it with every problem found (project is None if any)."""
    return _Loader(Path(root), os.environ if env is None else env, offline).load()


def load_settings(root: Path | str = ".", env: Mapping[str, str] | None = None) -> Settings:
    """Only config/middleware.yaml, for a command that needs nothing else (``trace``); raises
    :class:`ConfigError` with its problems."""
    loader = _Loader(Path(root), os.environ if env is None else env)
    settings = loader._settings()
    if loader.problems or settings is None:
        raise ConfigError(loader.problems or [Problem("config/middleware.yaml", 1, "invalid settings")])
    return settings


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Loader:
    """One load of one project; collects problems as it goes."""

    def __init__(self, root: Path, env: Mapping[str, str], offline: bool = False) -> None:
        self.root = root
        self.env = env
        self.offline = offline  # nothing will be delivered: connectors' unset ${VAR}s do not matter
        self.problems: list[Problem] = []
        self.broken_connectors: set[str] = set()  # declared, but their file has problems
        self.broker_url: str | None = None  # the broker ordered deliveries will meet (None offline)

    def load(self) -> tuple[Project | None, list[Problem]]:
        if not self.root.is_dir():
            return None, [Problem(str(self.root), 1, "project folder does not exist")]
        settings = self._settings()
        self.broker_url = settings.broker_url if settings is not None and not self.offline else None
        schemas = SchemaRegistry.load(self.root / "schemas", self.root)
        self.problems += schemas.problems
        lookups = self._lookups()
        connectors = self._connectors()
        routes = self._routes(schemas, lookups, connectors)
        if not routes and not any(p.file.startswith("routes") for p in self.problems):
            self.problems.append(Problem("routes/", 1, "no routes: add a routes/<name>.yaml"))
        if settings is not None:
            self._check_listeners(settings, routes)
        if self.problems or settings is None:
            return None, self.problems
        return Project(self.root, settings, routes, connectors, schemas, lookups), []

    def _check_listeners(self, settings: Settings, routes: Mapping[str, Route]) -> None:
        queues = sorted(r.source_queue for r in routes.values())
        seen: dict[tuple[str, int], MllpListener | HttpListener] = {}
        for listener in settings.mllp:
            routes_broken = any(p.file.startswith("routes") for p in self.problems)  # avoid follow-on noise
            if routes and not routes_broken and listener.queue not in queues:
                consumed = ", ".join(queues)
                self.problems.append(Problem(listener.file, listener.line, f"ingest.mllp {listener.name}: no route "
                                             f"consumes queue {listener.queue!r} (routes consume: {consumed})"))
            self._claim_port("mllp", listener, seen)
        for http in settings.http:
            for name in http.routes:
                if routes and name not in routes:
                    self.problems.append(Problem(http.file, http.line, f"ingest.http {http.name}: routes: no route "
                                                 f"named {name!r} (routes: {', '.join(sorted(routes))})"))
            self._claim_port("http", http, seen)
        for folder in settings.ingest.get("folder", ()):
            routes_broken = any(p.file.startswith("routes") for p in self.problems)
            if not routes or routes_broken:
                continue
            if folder.route and folder.route not in routes:
                self.problems.append(Problem(folder.file, folder.line, f"ingest.folder {folder.name}: no route "
                                             f"named {folder.route!r} (routes: {', '.join(sorted(routes))})"))
            elif folder.queue and folder.queue not in queues:
                self.problems.append(Problem(folder.file, folder.line, f"ingest.folder {folder.name}: no route "
                                             f"consumes queue {folder.queue!r} (routes consume: {', '.join(queues)})"))

    def _claim_port(self, kind: str, listener: MllpListener | HttpListener,
                    seen: dict[tuple[str, int], MllpListener | HttpListener]) -> None:
        """Record ``listener``'s host and port in ``seen``; a problem if another listener has it (port 0: any)."""
        key = (listener.host, listener.port)
        if key in seen and listener.port != 0:
            self.problems.append(Problem(listener.file, listener.line, f"ingest.{kind} {listener.name}: port "
                                         f"{listener.port} is already used by {seen[key].name}"))
        seen[key] = listener

    # -- files -----------------------------------------------------------------------------

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _read(self, path: Path, schema: dict[str, Any], *, with_env: bool = False,
              prepare: Callable[[YamlDoc], None] | None = None) -> YamlDoc:
        """Load a YAML file (``${VAR}`` interpolated when ``with_env``; ``prepare`` applied: fragments
        included) and check it against ``schema``."""
        doc = load_yaml(path, self._rel(path))
        if doc.data is None and not doc.problems:
            doc.problem((), "file is empty")
        if not doc.problems and with_env:
            doc.data = interpolate(doc, self.env)
        if not doc.problems and prepare is not None:
            prepare(doc)
        if not doc.problems:
            self._check_schema(doc, schema)
        return doc

    def _check_schema(self, doc: YamlDoc, schema: dict[str, Any]) -> None:
        for error in Draft202012Validator(schema).iter_errors(doc.data):
            self._report_schema_error(doc, error)

    def _report_schema_error(self, doc: YamlDoc, error: JsonSchemaError) -> None:
        path: PathKey = tuple(error.absolute_path)
        where = ".".join(str(p) for p in path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed)):
                owner = error.schema.get("x-key-of", {}).get(key)  # a key of another connector type / format
                hint = f" (a key of {owner})" if owner else _did_you_mean(key, allowed)
                doc.problem((*path, key), f"unknown key {key!r}{hint}" + (f" in {where}" if where else ""))
        elif error.validator == "required":
            doc.problem(path, f"missing key: {error.message.split(' is a ')[0]}" + (f" in {where}" if where else ""))
        elif error.validator in ("allOf", "if"):
            return  # the failing branch is reported by its own error
        elif error.validator == "enum":
            options = ", ".join(str(o) for o in error.validator_value)
            doc.problem(path, f"{where}: {error.instance!r} is not one of: {options}"
                        + (_did_you_mean(str(error.instance), [str(o) for o in error.validator_value])))
        elif error.validator == "type":
            types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            doc.problem(path, f"{where or 'document'}: expected {' or '.join(types)}, "
                              f"got {type(error.instance).__name__}")
        else:
            doc.problem(path, f"{where or 'document'}: {mask_secrets(error.message)}")  # it quotes the value

    def _settings(self) -> Settings | None:
        path = self.root / "config" / "middleware.yaml"
        values: dict[str, Any] = {}
        if path.exists():
            doc = self._read(path, project_schema.config_schema(gateway_specs()), with_env=True)
            data = doc.data if not doc.problems else {}
            self.problems += doc.problems
            broker, engine, metrics = (data.get(k) or {} for k in ("broker", "engine", "metrics"))
            values = {
                "broker_url": broker.get("url"),
                "queue_prefix": broker.get("queue_prefix"),
                "broker_tls": self._tls(doc, ("broker", "tls"), broker.get("tls")),
                "prefetch": engine.get("prefetch"),
                "delivery_limit": engine.get("delivery_limit"),
                "timezone": engine.get("timezone"),
                "drain_timeout": engine.get("drain_timeout"),
                "metrics_host": metrics.get("host"),
                "metrics_port": metrics.get("port"),
                "audit_path": (data.get("audit") or {}).get("path"),
                "journal": _journal_settings(data.get("journal") or {}),
                "tracing": tracing_settings(data.get("tracing") or {}),
                "ingest": self._listeners(doc, data.get("ingest") or {}),
            }
            missing = missing_problem(values["tracing"])
            if missing:  # enabled, but the otel extra is not installed
                doc.problem(("tracing", "enabled"), missing)
                self.problems += doc.problems[-1:]
            if values["timezone"]:
                try:
                    ZoneInfo(values["timezone"])
                except (ZoneInfoNotFoundError, ValueError):
                    doc.problem(("engine", "timezone"), f"unknown time zone {values['timezone']!r}")
                    self.problems += doc.problems[-1:]
        values["broker_url"] = self.env.get("MIDDLEWARE_BROKER_URL") or values.get("broker_url")
        if values.get("broker_tls") and str(values["broker_url"]).startswith("amqp://"):
            line = doc.line(("broker", "tls"))  # values holds broker_tls only when the file was read
            self.problems.append(Problem(doc.file, line, "broker.tls is set but the broker URL is amqp:// "
                                         "(no TLS): use amqps:// in broker.url or MIDDLEWARE_BROKER_URL"))
        values["queue_prefix"] = self.env.get("MIDDLEWARE_QUEUE_PREFIX", values.get("queue_prefix"))
        journal = values.get("journal") or JournalSettings()
        journal = replace(journal, url=self.env.get("MIDDLEWARE_JOURNAL_URL") or journal.url)
        values["journal"] = journal.anchored(self.root)
        settings = Settings(**{k: v for k, v in values.items() if v is not None})
        settings = replace(settings, audit_path=(self.root / settings.audit_path).absolute())  # links not resolved
        return _anchor_embedded_broker(settings, self.root)

    def _tls(self, doc: YamlDoc, at: PathKey, block: Mapping[str, Any] | None) -> TlsOptions | None:
        """A ``tls:`` block as :class:`TlsOptions`; files that cannot be used are problems at ``at``."""
        tls = TlsOptions.from_yaml(block, self.root)
        for key, message in tls.problems() if tls else []:
            doc.problem((*at, key) if block and key in block else at, f"{'.'.join(map(str, at))}.{message}")
            self.problems += doc.problems[-1:]
        return tls

    def _listeners(self, doc: YamlDoc, ingest: Mapping[str, list[dict[str, Any]]]) -> dict[str, tuple[Any, ...]]:
        """Every ``ingest.<kind>[]`` entry by kind: built-in kinds as their listener dataclass, others
        (third-party gateways) as the entry their spec validated, with ``file`` and ``line`` added."""
        readers = {"mllp": self._mllp_listener, "http": self._http_listener, "folder": self._folder_listener}
        listeners: dict[str, tuple[Any, ...]] = {}
        for kind, entries in ingest.items():
            read = readers.get(kind)
            listeners[kind] = tuple(read(doc, n, entry) if read else
                                    {**entry, "file": doc.file, "line": doc.line(("ingest", kind, n))}
                                    for n, entry in enumerate(entries or []))
        return listeners

    def _mllp_listener(self, doc: YamlDoc, index: int, entry: dict[str, Any]) -> MllpListener:
        name = entry.get("name") or f"mllp-{entry['port']}"
        options = {k: v for k, v in entry.items() if k not in ("name", "tls")}
        at: PathKey = ("ingest", "mllp", index)
        listener = MllpListener(name=name, **options, file=doc.file, line=doc.line(at))
        problems: list[tuple[tuple[str, ...], str]] = []
        if listener.max_buffered_bytes < listener.max_message_bytes:
            problems.append((("max_buffered_bytes",), f"must be at least max_message_bytes "
                                                      f"({listener.max_message_bytes})"))
        try:
            parse_networks(listener.allowed_peers)
        except ValueError as exc:
            problems.append((("allowed_peers",), str(exc)))
        listener = replace(listener, allowed_peers=tuple(listener.allowed_peers))
        if entry.get("tls"):
            block = entry["tls"]
            tls = MllpTls(cert_file=str(self.root / block["cert_file"]), key_file=str(self.root / block["key_file"]),
                          ca_file=str(self.root / block["ca_file"]) if block.get("ca_file") else None,
                          require_client_cert=bool(block.get("require_client_cert", False)))
            listener = replace(listener, tls=tls)
            if tls.require_client_cert and not tls.ca_file:
                problems.append((("tls", "require_client_cert"), "needs tls.ca_file (the CA that signs client "
                                                                 "certificates)"))
            else:
                try:
                    server_context(tls)
                except (OSError, ssl.SSLError) as exc:
                    problems.append((("tls",), f"cannot load the certificate, key or CA: {exc}"))
        for key, message in problems:
            self.problems.append(Problem(doc.file, doc.line((*at, *key)),
                                         f"ingest.mllp {name}: {'.'.join(key)}: {message}"))
        return listener

    def _http_listener(self, doc: YamlDoc, index: int, entry: dict[str, Any]) -> HttpListener:
        """One ``ingest.http[]`` entry (docs/ingest.md); its TLS files are checked like MLLP's."""
        name = entry.get("name") or f"http-{entry['port']}"
        auth = entry.get("auth") or {}
        options = {k: v for k, v in entry.items()
                   if k not in ("name", "auth", "routes", "rate_limit", "tls", "allowed_peers")}
        at: PathKey = ("ingest", "http", index)
        rate = entry.get("rate_limit")
        listener = HttpListener(
            name=name, **options, bearer_tokens=tuple(auth.get("bearer_tokens") or ()),
            api_keys=tuple(auth.get("api_keys") or ()), routes=tuple(entry.get("routes") or ()),
            allowed_peers=tuple(entry.get("allowed_peers") or ()),
            rate_limit=HttpRateLimit(float(rate["per_second"]), int(rate.get("burst") or max(1, rate["per_second"])))
            if rate else None, file=doc.file, line=doc.line(at))
        try:
            parse_networks(listener.allowed_peers)
        except ValueError as exc:
            self.problems.append(Problem(doc.file, doc.line((*at, "allowed_peers")),
                                         f"ingest.http {name}: allowed_peers: {exc}"))
        if entry.get("tls"):
            block = entry["tls"]
            tls = MllpTls(cert_file=str(self.root / block["cert_file"]), key_file=str(self.root / block["key_file"]),
                          ca_file=str(self.root / block["ca_file"]) if block.get("ca_file") else None,
                          require_client_cert=bool(block.get("require_client_cert", False)))
            listener = replace(listener, tls=tls)
            problem = None
            if tls.require_client_cert and not tls.ca_file:
                problem = "require_client_cert needs tls.ca_file (the CA that signs client certificates)"
            else:
                try:
                    server_context(tls)
                except (OSError, ssl.SSLError) as exc:
                    problem = f"cannot load the certificate, key or CA: {exc}"
            if problem:
                self.problems.append(Problem(doc.file, doc.line((*at, "tls")), f"ingest.http {name}: tls: {problem}"))
        return listener

    def _folder_listener(self, doc: YamlDoc, index: int, entry: dict[str, Any]) -> FolderListener:
        """One ``ingest.folder[]`` entry: its folders anchored to the project, the ledger's folder set."""
        inbox = self.root / entry["path"]
        name = entry.get("name") or f"folder-{index + 1}"
        options = {k: v for k, v in entry.items() if k not in ("name", "path", "done", "failed")}
        ledger = self.env.get("MIDDLEWARE_INGEST_LEDGER") or str(self.root / "var")
        return FolderListener(name=name, path=str(inbox), **options,
                              done=str(self.root / entry["done"]) if entry.get("done") else str(inbox / "done"),
                              failed=str(self.root / entry["failed"]) if entry.get("failed") else str(inbox / "failed"),
                              ledger=ledger, file=doc.file, line=doc.line(("ingest", "folder", index)))

    def _lookups(self) -> dict[str, LookupTable]:
        tables: dict[str, LookupTable] = {}
        for path in sorted((self.root / "config" / "lookups").glob("*.yaml")):
            doc = self._read(path, project_schema.LOOKUP)
            self.problems += doc.problems
            if not doc.problems:
                data = doc.data
                tables[path.stem] = LookupTable(path.stem, {str(k): v for k, v in data["values"].items()},
                                                data.get("default"))
        return tables

    def _connectors(self) -> dict[str, ConnectorSpec]:
        connectors: dict[str, ConnectorSpec] = {}
        schema = project_schema.connector_schema({n: c.spec for n, c in components("connector").items()})
        for path in sorted((self.root / "connectors").glob("*.yaml")):
            doc = self._read(path, schema, with_env=True)
            if self.offline and doc.problems and all(p.message.startswith("environment variable ")
                                                     for p in doc.problems):
                if isinstance(doc.data, dict) and isinstance(doc.data.get("connector"), str):
                    self.broken_connectors.add(doc.data["connector"])  # routes may still name it
                continue
            data = doc.data if not doc.problems else None
            if data is not None and data["connector"] in connectors:
                other = connectors[data["connector"]]
                doc.problem(("connector",), f"duplicate connector name {data['connector']!r} "
                                            f"(also in {other.file}:{other.line})")
            self.problems += doc.problems
            if doc.problems or data is None:
                if isinstance(doc.data, dict) and isinstance(doc.data.get("connector"), str):
                    self.broken_connectors.add(doc.data["connector"])  # reported once, in its own file
                continue
            options = {k: v for k, v in data.items()
                       if k not in ("connector", "type", "description", "retry", "breaker")}
            if isinstance(options.get("path"), str) and not Path(options["path"]).is_absolute():
                options["path"] = str(self.root / options["path"])  # relative to the project, not the cwd
            smart = options.get("smart")  # a fhir connector's SMART key file, likewise
            if isinstance(smart, dict) and isinstance(smart.get("private_key_file"), str):
                options["smart"] = {**smart, "private_key_file": str(self.root / smart["private_key_file"])}
            if self._connector_problems(doc, data["type"], options):
                self.broken_connectors.add(data["connector"])
                continue
            connectors[data["connector"]] = ConnectorSpec(
                name=data["connector"], type=data["type"], options=options,
                retry=_retry_policy(data.get("retry"), RetryPolicy()), breaker=_breaker_policy(data.get("breaker")),
                file=doc.file, line=doc.line(("connector",)))
        return connectors

    def _connector_problems(self, doc: YamlDoc, type_name: str, options: dict[str, Any]) -> bool:
        """Check what the schema cannot (key combinations, TLS files); resolves ``tls`` in ``options``
        to :class:`TlsOptions`. Returns whether problems were found."""
        found = len(self.problems)
        for key, message in connector_problems(type_name, options):
            doc.problem(key, message)
            self.problems += doc.problems[-1:]
        if "tls" in options:
            options["tls"] = self._tls(doc, ("tls",), options["tls"])
        return len(self.problems) > found

    def _routes(self, schemas: SchemaRegistry, lookups: Mapping[str, LookupTable],
                connectors: Mapping[str, ConnectorSpec]) -> dict[str, Route]:
        routes: dict[str, Route] = {}
        queues: dict[str, Route] = {}
        schema = project_schema.route_schema({n: c.spec for n, c in components("format").items()})
        fragments = Fragments.load(self.root, self._rel)  # routes/_fragments/: included by routes, not routes
        self.problems += fragments.problems
        for path in sorted((self.root / "routes").glob("*.yaml")):
            doc = self._read(path, schema, prepare=fragments.expand)
            if not doc.problems:
                route = _RouteCompiler(doc, schemas, lookups, connectors, self.broken_connectors,
                                       broker_url=self.broker_url).compile()
                for name, seen, what in ((route.name, routes, "route name"),
                                         (route.source_queue, queues, "source queue")):
                    if name in seen:
                        other = seen[name]
                        key: PathKey = ("route",) if what == "route name" else ("source", "queue")
                        doc.problem(key, f"duplicate {what} {name!r} (also in {other.file}:{other.line})")
                if not doc.problems:
                    routes[route.name] = route
                    queues[route.source_queue] = route
            self.problems += doc.problems
        return routes


def _journal_settings(block: Mapping[str, Any]) -> JournalSettings:
    """``journal:`` of config/middleware.yaml (already schema-checked) as :class:`JournalSettings`."""
    options = dict(block)
    for key in ("retention", "flush_interval"):
        seconds = parse_duration(block[key]) if key in block else None
        if seconds is not None:
            options[key] = seconds
    return JournalSettings(**options)


def _anchor_embedded_broker(settings: Settings, root: Path) -> Settings:
    """Resolve a relative ``filesystem://`` broker folder against the project folder."""
    prefix = "filesystem://"
    url = settings.broker_url
    if url.startswith(prefix) and not url[len(prefix):].startswith("/"):
        folder = (root / url[len(prefix):]).resolve()
        return Settings(**{**settings.__dict__, "broker_url": f"{prefix}{folder}"})
    return settings


def _retry_policy(spec: Mapping[str, Any] | None, base: RetryPolicy) -> RetryPolicy:
    """``base`` with the keys of a YAML ``retry:`` block applied."""
    if not spec:
        return base
    backoff = spec.get("backoff", {})
    return RetryPolicy(
        attempts=spec.get("attempts", base.attempts),
        initial=backoff.get("initial", base.initial),
        max=backoff.get("max", base.max),
        multiplier=backoff.get("multiplier", base.multiplier),
        jitter=backoff.get("jitter", base.jitter),
        retry_on=frozenset(spec["retry_on"]) if "retry_on" in spec else base.retry_on,
        delays=tuple(max(1, math.ceil(parse_duration(d) or 0)) for d in spec["delays"]) if "delays" in spec
        else base.delays,
        max_age=parse_duration(spec["max_age"]) if "max_age" in spec else base.max_age,
    )


def _breaker_policy(spec: Mapping[str, Any] | None) -> BreakerPolicy:
    """A connector's ``breaker:`` block over the defaults."""
    base = BreakerPolicy()
    if not spec:
        return base
    probe_every = parse_duration(spec["probe_every"]) if "probe_every" in spec else None
    return BreakerPolicy(failures=spec.get("failures", base.failures),
                         probe_every=base.probe_every if probe_every is None else probe_every)


def _sla(spec: Mapping[str, Any] | None) -> Sla | None:
    """A route's ``sla:`` (schema-checked: durations and a rate) as :class:`Sla`."""
    if not spec:
        return None
    return Sla(**{k: float(v) if k == "max_error_rate" else parse_duration(v) for k, v in spec.items()})


class _RouteCompiler:
    """Compiles one schema-valid route document, recording problems on it."""

    def __init__(self, doc: YamlDoc, schemas: SchemaRegistry, lookups: Mapping[str, LookupTable],
                 connectors: Mapping[str, ConnectorSpec], broken_connectors: set[str], *,
                 broker_url: str | None = None) -> None:
        self.doc = doc
        self.broken_connectors = broken_connectors
        self.broker_url = broker_url  # ordered deliveries need RabbitMQ (None: offline, not checked)
        self.data: dict[str, Any] = doc.data
        self.schemas = schemas
        self.lookups = lookups
        self.connectors = connectors
        self.format = get_format(self.data["source"]["format"], self.data["source"])
        if self.data["source"].get("split") is False:
            self.format = Unsplit(self.format)

    def compile(self) -> Route:
        data = self.data
        events = tuple(r for i, spec in enumerate(data["events"]) if (r := self._event(i, spec)) is not None)
        return Route(
            name=data["route"],
            source_queue=data["source"]["queue"],
            format=self.format,
            events=events,
            deliver=tuple(self._delivery(i, spec) for i, spec in enumerate(data.get("deliver", []))),
            filter=self._condition(("filter",), data.get("filter")),
            match=data.get("match", "first"),
            validation=self._validation(),
            sla=_sla(data.get("sla")),
            description=data.get("description", ""),
            file=self.doc.file,
            line=self.doc.line(("route",)),
        )

    def _validation(self) -> str:
        mode = str(self.data.get("validation", "lenient"))
        if mode == "strict" and not hasattr(self.format, "check_structure"):
            self.doc.problem(("validation",), f"validation: strict is not available for format {self.format.name}"
                                              " (it is for hl7v2)")
        return mode

    def _condition(self, path: PathKey, spec: Any) -> Any:
        if spec is None:
            return None
        try:
            return compile_condition(spec, self.format, self.lookups,
                                     FilterError if path == ("filter",) else MappingError)
        except SpecError as exc:
            self.doc.problem((*path, exc.key) if exc.key else path, str(exc))
            return None

    def _event(self, index: int, spec: dict[str, Any]) -> EventRule | None:
        at: PathKey = ("events", index)
        schema = self.schemas.get(spec["type"], spec["version"])
        if schema is None:
            self.doc.problem((*at, "type"), f"no schema for {spec['type']} v{spec['version']}: "
                                            f"add schemas/{spec['type']}/{spec['version']}.json")
        fields = []
        for target, source in spec["map"].items():
            try:
                fields.append(compile_field(target, source, self.format, self.lookups))
            except SpecError as exc:
                key: PathKey = (*at, "map", target)
                self.doc.problem((*key, exc.key) if exc.key and isinstance(source, dict) else key, str(exc))
        targets = sorted(spec["map"])
        for a, b in itertools.pairwise(targets):
            if b.startswith(a + "."):
                self.doc.problem((*at, "map", b), f"target {b!r} is inside target {a!r}: map one or the other")
        subject = spec.get("subject")
        if subject:
            for placeholder in subject_placeholders(subject):
                if placeholder not in spec["map"]:
                    self.doc.problem((*at, "subject"), f"subject uses {{{placeholder}}}, which the map does not set")
        when = self._condition((*at, "when"), spec.get("when"))
        for_each = spec.get("for_each")
        if for_each is not None:
            try:
                self.format.each_scope(for_each)
            except ValueError as exc:
                self.doc.problem((*at, "for_each"), f"for_each: {exc}")
        if schema is None:
            return None
        if len(fields) == len(spec["map"]):  # (a field that did not compile is reported already)
            for key, message in check_map(fields, schema.validator.schema):  # targets, types, enums, required
                self.doc.problem((*at, "map", *key), f"{message} ({schema.event_type} v{schema.major})")
        return EventRule(spec["type"], spec["version"], schema, tuple(fields), when, subject, self.doc.line(at),
                         for_each=for_each)

    def _delivery(self, index: int, spec: dict[str, Any]) -> DeliveryRule:
        name = spec["to"]
        connector = self.connectors.get(name)
        if connector is None and name not in self.broken_connectors:
            self.doc.problem(("deliver", index, "to"), f"no connector {name!r} in connectors/"
                                                       f"{_did_you_mean(name, sorted(self.connectors))}")
        retry = _retry_policy(spec["retry"], connector.retry) if connector and "retry" in spec else None
        retry = retry or (connector.retry if connector else None)  # the effective policy: topology reads its delays
        return DeliveryRule(name, retry, outbound=self._outbound(index, spec), ordering=self._ordering(index, spec))

    def _ordering(self, index: int, spec: dict[str, Any]) -> Ordering | None:
        """A deliver entry's ``ordering:`` block (:mod:`middleware.ordering`), problems at their line."""
        if "ordering" not in spec:
            return None
        ordering = Ordering.of(spec["ordering"])
        events = self.data["events"]
        for key, message in ordering_problems(ordering, [list(e["map"]) for e in events],
                                              [bool(e.get("subject")) for e in events], self.broker_url):
            self.doc.problem(("deliver", index, "ordering", *key), message)
        return ordering

    def _outbound(self, index: int, spec: dict[str, Any]) -> Outbound | None:
        """A deliver entry's ``when:`` and ``map:`` (paths over the CloudEvent), problems at their line."""
        if "when" not in spec and "map" not in spec:
            return None
        at: PathKey = ("deliver", index)
        when = mapping = None
        try:
            when = compile_when(spec["when"]) if "when" in spec else None
        except SpecError as exc:
            self.doc.problem((*at, "when", exc.key) if exc.key else (*at, "when"), f"when: {exc}")
        try:
            mapping = compile_map(spec["map"], self.lookups) if "map" in spec else None
        except SpecError as exc:
            self.doc.problem((*at, "map", exc.key) if exc.key else (*at, "map"), f"map: {exc}")
        return Outbound(when, mapping)



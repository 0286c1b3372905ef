"""The component registry: name -> (config spec, factory) for connectors, formats and ingest gateways.

Each component is one module that calls :func:`register` beside its code, with a spec of the YAML
keys it accepts (a JSON Schema object fragment: ``properties``, ``required``, a ``description`` per
key and optional ``default``). ``middleware validate`` checks each connector, route source and
ingest listener against its own spec (file:line errors), and the key tables in docs/ are printed
from the same specs (``python -m middleware.spec --markdown``).

Built-in components and third-party packages are found the same way, through entry points
(pyproject.toml ``[project.entry-points."middleware.connectors"]``, ``"middleware.formats"``,
``"middleware.ingest"``): each entry point names the module that registers the component under the
entry point's name. Loading them happens once per process, on first use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

GROUPS: Mapping[str, str] = {  # component kind -> entry-point group
    "connector": "middleware.connectors",
    "format": "middleware.formats",
    "ingest": "middleware.ingest",
}
WHERE: Mapping[str, str] = {  # component kind -> where its keys are written in YAML
    "connector": "connectors/<name>.yaml (beside connector, type, description, retry)",
    "format": "a route's source: block (beside queue, format)",
    "ingest": "config/middleware.yaml, ingest.<kind>[] (one entry per listener)",
}
EMPTY_SPEC: Mapping[str, Any] = {"type": "object", "properties": {}}


class RegistryError(Exception):
    """A component that cannot be registered or loaded (a packaging mistake, not a user's YAML)."""


@dataclass(frozen=True)
class Component:
    """One registered component: its ``kind`` ("connector", "format", "ingest"), the ``name`` used in
    YAML, the JSON Schema ``spec`` of its own keys and the ``factory`` that builds it."""

    kind: str
    name: str
    spec: Mapping[str, Any]
    factory: Callable[..., Any]

    @property
    def keys(self) -> Mapping[str, Mapping[str, Any]]:
        """The spec's keys, each with its JSON Schema."""
        properties: Mapping[str, Mapping[str, Any]] = self.spec.get("properties", {})
        return properties

    @property
    def required(self) -> list[str]:
        return list(self.spec.get("required", []))


_registry: dict[str, dict[str, Component]] = {kind: {} for kind in GROUPS}
_loaded: set[str] = set()


def register(kind: str, name: str, spec: Mapping[str, Any] | None, factory: Callable[..., Any]) -> Component:
    """Make ``factory`` available as ``name`` among the ``kind`` components, with its ``spec``.

    Registering the same name again with the same factory is a no-op (a module imported twice);
    another factory under a taken name is a :class:`RegistryError`.
    """
    if kind not in GROUPS:
        raise RegistryError(f"unknown component kind {kind!r} (kinds: {', '.join(GROUPS)})")
    spec = spec or EMPTY_SPEC
    if spec.get("type") != "object" or not isinstance(spec.get("properties", {}), Mapping):
        raise RegistryError(f"{kind} {name!r}: a spec is a JSON Schema object with properties")
    existing = _registry[kind].get(name)
    if existing is not None and _qualname(existing.factory) != _qualname(factory):
        raise RegistryError(f"{kind} {name!r} is registered twice ({_qualname(existing.factory)} and "
                            f"{_qualname(factory)})")
    component = Component(kind, name, spec, factory)
    _registry[kind][name] = component
    return component


def unregister(kind: str, name: str) -> None:
    """Forget the ``kind`` component ``name`` (a test's own connector type, once the test is over)."""
    _registry[kind].pop(name, None)


def components(kind: str) -> dict[str, Component]:
    """Every registered ``kind`` component by name (entry points loaded on first use)."""
    _load(kind)
    return dict(sorted(_registry[kind].items()))


def component(kind: str, name: str) -> Component:
    """One component; raises ``KeyError`` for a name nothing registered."""
    return components(kind)[name]


def _load(kind: str) -> None:
    if kind in _loaded:
        return
    _loaded.add(kind)
    for point in entry_points(group=GROUPS[kind]):
        try:
            point.load()  # the module registers its component(s) on import
        except Exception as exc:  # a broken plug-in names itself instead of a bare traceback
            raise RegistryError(f"entry point {point.name} = {point.value} ({GROUPS[kind]}) failed to load: "
                                f"{type(exc).__name__}: {exc}") from exc
        if point.name not in _registry[kind]:
            raise RegistryError(f"entry point {point.name} = {point.value} ({GROUPS[kind]}) registered no "
                                f"{kind} named {point.name!r}")


def _qualname(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


# -- docs -----------------------------------------------------------------------------------------


def _type_of(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(schema.get('items', {}))}"
    if kind == "object" and "properties" in schema:
        return "mapping: " + ", ".join(f"`{key}`" for key in schema["properties"])
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def key_table(item: Component) -> str:
    """A Markdown table of a component's keys: key, type, required or default, meaning."""
    lines = ["| key | type | required / default | meaning |", "|---|---|---|---|"]
    for key, schema in item.keys.items():
        need = "required" if key in item.required else (f"`{schema['default']}`" if "default" in schema else "")
        meaning = str(schema.get("description", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{key}` | {_type_of(schema)} | {need} | {meaning} |")
    return "\n".join(lines)


def markdown(selector: str) -> str:
    """The key tables of every registered component of a kind (``connector``), or of one
    (``ingest.mllp``), one section each: what docs/ hold between ``<!-- spec:<selector> -->`` markers."""
    kind, _, name = selector.partition(".")
    chosen = [components(kind)[name]] if name else list(components(kind).values())
    parts = []
    for item in chosen:
        parts.append(f"#### {kind} `{item.name}`\n\nIn {WHERE[kind]}.\n\n"
                     + (key_table(item) if item.keys else "No keys of its own."))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m middleware.spec --markdown [--kind connector | --kind ingest.mllp]``: print the docs' key tables."""
    parser = argparse.ArgumentParser(prog="python -m middleware.spec", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="print Markdown key tables")
    parser.add_argument("--kind", action="append", help="only this kind (connector, format, ingest) or component "
                                                        "(ingest.mllp); repeatable")
    args = parser.parse_args(argv)
    selectors = args.kind or list(GROUPS)
    unknown = [s for s in selectors if s.partition(".")[0] not in GROUPS]
    if unknown:
        parser.error(f"unknown kind {unknown[0]!r} (kinds: {', '.join(GROUPS)})")
    if not args.markdown:
        for kind in selectors:
            print(kind + ": " + ", ".join(components(kind)))
        return 0
    sys.stdout.write("\n".join(markdown(selector) for selector in selectors))
    return 0


if __name__ == "__main__":
    from middleware import spec as _imported  # components register in the imported module, not in __main__

    raise SystemExit(_imported.main())

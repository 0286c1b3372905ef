"""middleware.formats.fhir_types: the resource type names match the installed fhir.resources (R4B)."""

from __future__ import annotations

import importlib
import pkgutil

import fhir.resources.R4B as r4b
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

from middleware.formats.fhir import is_resource_type
from middleware.formats.fhir_types import RESOURCE_TYPES


def _registry() -> tuple[set[str], set[str]]:
    """(resource types, other model class names) of fhir.resources' R4B package."""
    resources, others = set(), set()
    for module in pkgutil.iter_modules(r4b.__path__):
        loaded = importlib.import_module(f"{r4b.__name__}.{module.name}")
        for name, value in vars(loaded).items():
            if isinstance(value, type) and value.__module__ == loaded.__name__ and name[:1].isupper():
                try:
                    model = get_fhir_model_class(name)
                except (ValueError, AttributeError, ImportError, KeyError):
                    others.add(name)
                    continue
                (resources if isinstance(model, type) and issubclass(model, Resource) else others).add(name)
    return resources, others


def test_resource_types_are_fhir_resources_registry() -> None:
    resources, others = _registry()
    assert set(RESOURCE_TYPES) == resources
    assert all(is_resource_type(name) for name in resources)
    assert not any(is_resource_type(name) for name in others - resources)  # HumanName, Reference, ...
    assert not is_resource_type("patient") and not is_resource_type("") and not is_resource_type("Patient ")

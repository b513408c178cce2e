"""Registry of model families, looked up from the pipeline being trained.

Every module of this package is imported and its `DreamBoothFamily` subclasses that name pipeline classes are
registered, so adding a family is adding one file.
"""

import importlib
import inspect
import pkgutil

from diffusers import DiffusionPipeline

from ..safeguards import DreamBoothInputError
from .base import DreamBoothFamily, ImageConditioning


def _discover_families() -> tuple[type[DreamBoothFamily], ...]:
    """The classes of this package's modules that name the pipelines they train (not the shared bases), by module
    name, then in definition order within a module."""
    found = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        classes = [
            cls
            for cls in vars(module).values()
            if inspect.isclass(cls)
            and issubclass(cls, DreamBoothFamily)
            and cls.__module__ == module.__name__
            and "pipeline_class_names" in vars(cls)
        ]
        found += sorted(classes, key=lambda cls: inspect.getsourcelines(cls)[1])
    return tuple(found)


#: Supported families.
FAMILIES: tuple[type[DreamBoothFamily], ...] = _discover_families()


def family_for_pipeline(pipeline: DiffusionPipeline) -> DreamBoothFamily:
    """The family adapter for `pipeline`, found by its class name, else by the nearest base class that one trains."""
    for cls in type(pipeline).__mro__:
        family = family_class_named(cls.__name__)
        if family is not None:
            return family(pipeline)
    supported = ", ".join(name for family in FAMILIES for name in family.pipeline_class_names)
    raise DreamBoothInputError(
        f"DreamBooth training does not support `{type(pipeline).__name__}`. Supported pipelines: {supported}."
    )


def family_class_named(class_name: str | None) -> type[DreamBoothFamily] | None:
    """The family that trains the pipeline class named `class_name` (as `model_index.json` names it), or None."""
    return next((family for family in FAMILIES if class_name in family.pipeline_class_names), None)


__all__ = ["FAMILIES", "DreamBoothFamily", "ImageConditioning", "family_class_named", "family_for_pipeline"]

"""Registry of model families, looked up from the pipeline being trained."""

from diffusers import DiffusionPipeline

from ..safeguards import DreamBoothInputError
from .base import DreamBoothFamily, ImageConditioning
from .deepfloyd_if import DeepFloydIFFamily, DeepFloydIFSuperResolutionFamily
from .flux import FluxFamily
from .stable_diffusion import StableDiffusionFamily
from .stable_diffusion_3 import StableDiffusion3Family
from .stable_diffusion_xl import StableDiffusionXLFamily

#: Supported families, in lookup order.
FAMILIES: tuple[type[DreamBoothFamily], ...] = (
    StableDiffusionFamily,
    StableDiffusionXLFamily,
    StableDiffusion3Family,
    FluxFamily,
    DeepFloydIFFamily,
    DeepFloydIFSuperResolutionFamily,
)


def family_for_pipeline(pipeline: DiffusionPipeline) -> DreamBoothFamily:
    """The family adapter for `pipeline`, found by its class (or a base class) name."""
    class_names = [cls.__name__ for cls in type(pipeline).__mro__]
    for family in FAMILIES:
        if any(name in family.pipeline_class_names for name in class_names):
            return family(pipeline)
    supported = ", ".join(name for family in FAMILIES for name in family.pipeline_class_names)
    raise DreamBoothInputError(
        f"DreamBooth training does not support `{type(pipeline).__name__}`. Supported pipelines: {supported}."
    )


def family_class_named(class_name: str | None) -> type[DreamBoothFamily] | None:
    """The family that trains the pipeline class named `class_name` (as `model_index.json` names it), or None."""
    return next((family for family in FAMILIES if class_name in family.pipeline_class_names), None)


__all__ = ["FAMILIES", "DreamBoothFamily", "ImageConditioning", "family_class_named", "family_for_pipeline"]

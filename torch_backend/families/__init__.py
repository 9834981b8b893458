"""One module per model family of the PyTorch trainer: what it loads, how a prompt becomes the denoiser's conditioning
and its loss. The family is chosen once, from the pipeline's model_index.json (textual_inversion_core.families)."""

from textual_inversion_core import families as core_families

from .flux import Flux
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

CLASSES = {cls.spec.name: cls for cls in (SD, SDXL, SD3, Flux)}


def family_spec(args):
    """The core FamilySpec of --pretrained_model_name_or_path: from model_index.json on this machine, else from the
    Hub's (downloaded by diffusers)."""
    spec = core_families.family_of(args.pretrained_model_name_or_path, args.revision)
    if spec is None:
        from diffusers import DiffusionPipeline

        from .base import load_error

        try:
            index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
        except (OSError, ValueError, EnvironmentError) as err:
            raise load_error(args.pretrained_model_name_or_path, err) from err
        spec = core_families.family_from_index(index)
    return spec


def select(args, spec=None):
    """The PyTorch family object of the run."""
    return CLASSES[(spec or family_spec(args)).name](args)

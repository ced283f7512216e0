"""The sandbox world: a procedural text-to-image domain with tiny models the project trains and ships itself.

Paths to the shipped assets (built by ``scripts/build_sandbox.py`` and ``scripts/build_preference_data.py``):

- ``SANDBOX_PIPELINE``: a standard diffusers ``StableDiffusionPipeline`` directory (the base model);
- ``SANDBOX_UNET_EARLY``: an earlier UNet checkpoint of the same model (a second "model" for preference data);
- ``SANDBOX_DISTILLED``: the base distilled to 4 steps without guidance (``unet/`` + ``scheduler/``, SDXL-Turbo's
  Euler-ancestral "trailing" sampler; ``scripts/distill_sandbox.py``; loaded as ``"sandbox-4step"``);
- ``SANDBOX_CLIP``: the tiny CLIP (transformers ``CLIPModel`` + processor directory), also a reward in the catalog;
- ``SANDBOX_DATA``: Pick-a-Pic-v2-schema preference data (Parquet, ``datasets.load_dataset(SANDBOX_DATA)``);
- ``REWARD_MODELS_DIR``: the reward catalog (``reward_models/``), shipped inside the package too.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"
SANDBOX_PIPELINE = ASSETS_DIR / "pipeline"
SANDBOX_UNET_EARLY = ASSETS_DIR / "unet-early"
SANDBOX_DISTILLED = ASSETS_DIR / "distilled"
SANDBOX_DATA = ASSETS_DIR / "pickapic"


def _reward_models_dir() -> Path:
    """The reward catalog: the checkout's ``reward_models/``. ``diffalign/reward_models`` is a symbolic link to it,
    which a wheel stores as a real folder (``pyproject.toml``'s package data), so one path serves a checkout, an
    editable and a non-editable install; a checkout without symbolic links (Windows) falls back on the real folder."""
    packaged = PACKAGE_DIR.parent / "reward_models"
    return packaged.resolve() if packaged.is_dir() else REPO_ROOT / "reward_models"


REWARD_MODELS_DIR = _reward_models_dir()
SANDBOX_CLIP = REWARD_MODELS_DIR / "sandbox-clip"

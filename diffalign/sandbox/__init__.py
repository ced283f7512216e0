"""The sandbox world: a procedural text-to-image domain with tiny models the project trains and ships itself.

Paths to the shipped assets (built by ``scripts/build_sandbox.py`` and ``scripts/build_preference_data.py``):

- ``SANDBOX_PIPELINE``: a standard diffusers ``StableDiffusionPipeline`` directory (the base model);
- ``SANDBOX_UNET_EARLY``: an earlier UNet checkpoint of the same model (a second "model" for preference data);
- ``SANDBOX_CLIP``: the tiny CLIP (transformers ``CLIPModel`` + processor directory), also a reward in the catalog;
- ``SANDBOX_DATA``: Pick-a-Pic-v2-schema preference data (Parquet, ``datasets.load_dataset(SANDBOX_DATA)``).
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"
SANDBOX_PIPELINE = ASSETS_DIR / "pipeline"
SANDBOX_UNET_EARLY = ASSETS_DIR / "unet-early"
SANDBOX_DATA = ASSETS_DIR / "pickapic"
REWARD_MODELS_DIR = REPO_ROOT / "reward_models"
SANDBOX_CLIP = REWARD_MODELS_DIR / "sandbox-clip"

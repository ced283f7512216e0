"""Where a preference dataset named on the command line lives.

``"sandbox"`` names the shipped sandbox data (``diffalign/sandbox/assets/pickapic``, built by
``scripts/build_preference_data.py``); anything else is passed through unchanged to ``datasets.load_dataset`` /
:func:`diffalign.data.pickapic.load_pickapic_split` (a Pick-a-Pic-schema directory, Parquet file or glob, or a hub
id). The training loops, the reward-model trainer and the evaluation all resolve names here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["resolve_built_dataset", "resolve_dataset"]


def resolve_dataset(name: str) -> str:
    """``"sandbox"`` → the shipped sandbox data directory (``SANDBOX_DATA``); ``"sandbox-ppd"`` (and the other
    :data:`~diffalign.data.ppd.NAMED_BUILDS`, e.g. ``"sandbox-ppd-6u"``) → a multi-user relabelling of it
    (:mod:`diffalign.data.ppd`, built on first use into the cache); anything else unchanged."""
    if name == "sandbox":
        from ..sandbox import SANDBOX_DATA

        return str(SANDBOX_DATA)
    # the sandbox pairs relabelled by a user population, built once into a cache
    if name.startswith("sandbox-ppd"):
        from .ppd import named_build_dir

        built = named_build_dir(name)
        if built is not None:
            return str(built)
    return name


def resolve_built_dataset(name: str, instead: str = "") -> str:
    """:func:`resolve_dataset`, and for ``"sandbox"`` a ``FileNotFoundError`` when the data is not built yet
    (naming the directory and the build command; ``instead``: what else the user can do, e.g. "train on rendered
    pairs with --source rendered")."""
    path = resolve_dataset(name)
    if name == "sandbox" and not Path(path).is_dir():
        raise FileNotFoundError(
            f"the sandbox preference data {path} is not built yet: run "
            "`python scripts/build_preference_data.py`" + (f", or {instead}" if instead else "")
        )
    return path

"""Checks of what a configuration names on disk, run before anything heavy loads (no torch is imported here).

- :func:`check_paths`: the output directory, local model and dataset paths (a glob of Parquet files must match
  something), an explicit checkpoint to resume from;
- :func:`check_training_data`: a local Pick-a-Pic-format source of offline training: the training split's files have
  the columns pairs need, and the final evaluation's ``eval_split`` exists (it would otherwise fail only after the
  whole training);
- :func:`check_reward`: a reward is a catalog name or a manifest file.

Each raises :class:`~diffalign.errors.ConfigError` (or its subclass ``SchemaError``) with one line naming the field,
file or split and what to do; the scripts print it as such.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

GLOB_CHARS = "*?["


def looks_local(value: str) -> bool:
    """A path rather than a hub id ``owner/name``: absolute, relative with ./ or ~, or with more than one ``/``."""
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or os.sep != "/" and os.sep in value


def check_paths(cfg: Any) -> None:
    """``output_dir`` is not a file; a local ``pretrained_model`` / ``dataset`` exists (named sandbox ones and hub ids
    pass); a ``dataset`` glob matches a file; an explicit ``resume_from_checkpoint`` is a directory."""
    from .config import NAMED_DATASETS, NAMED_MODELS

    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"config field output_dir={cfg.output_dir!r} is a file: give a directory")
    for name, named in (("pretrained_model", NAMED_MODELS), ("dataset", NAMED_DATASETS)):
        value = getattr(cfg, name)
        if name == "dataset" and any(ch in value for ch in GLOB_CHARS):  # a glob of Parquet files
            if not glob.glob(os.path.expanduser(value)):
                raise ConfigError(
                    f"config field dataset={value!r}: no file matches this pattern; check the path"
                )
            continue
        if value not in named and not Path(os.path.expanduser(value)).exists() and looks_local(value):
            raise ConfigError(
                f"config field {name}={value!r}: no such local directory (a hub id is 'owner/name'); check the path"
            )
    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise ConfigError(
            f"config field resume_from_checkpoint={resume!r}: no such directory; give a checkpoint-N directory or "
            "'latest'"
        )


def check_training_data(cfg: Any) -> None:
    """A personalised objective that evaluates at the end needs a PPD build (its ``users.json``). For a local
    Parquet ``dataset`` of offline training (not a named sandbox set, not streamed): the files of ``split`` have the
    columns pairs need; unless ``skip_eval``, the dataset is a directory (Parquet files are one
    split, so ``eval_split`` would read the training captions) and has ``eval_split`` (a personalised objective
    evaluates on its users' own splits instead). Only Parquet schemas are read."""
    from .config import NAMED_DATASETS
    from .data.schema import PAIR_REQUIRED_COLUMNS
    from .data.splits import check_pair_source
    from .objectives.registry import get_objective

    personal = get_objective(cfg.objective).conditioning == "user"
    ppd_build = cfg.dataset.startswith("sandbox-ppd") or (Path(cfg.dataset) / "users.json").is_file()
    if personal and not cfg.skip_eval and not ppd_build:
        raise ConfigError(
            f"config field dataset={cfg.dataset!r}: objective {cfg.objective!r} ends with a per-user evaluation, "
            f"which reads {Path(cfg.dataset) / 'users.json'}, and it is not there: give a sandbox-ppd build "
            "directory (scripts/build_ppd_data.py) or 'sandbox-ppd', or set skip_eval true"
        )
    if cfg.dataset in NAMED_DATASETS or cfg.streaming:
        return
    check_pair_source(cfg.dataset, cfg.split, PAIR_REQUIRED_COLUMNS)
    if cfg.skip_eval:
        return
    if any(ch in cfg.dataset for ch in GLOB_CHARS) or cfg.dataset.endswith(".parquet"):
        raise ConfigError(
            f"config field dataset={cfg.dataset!r} names Parquet files, which are one split: the final evaluation's "
            f"eval_split {cfg.eval_split!r} would read the training captions. Put the files in a directory in the Hub "
            f"layout (data/<split>-00000-of-00001.parquet, with a {cfg.eval_split} split), or set skip_eval true"
        )
    if not personal:
        check_pair_source(cfg.dataset, cfg.eval_split, ("caption",))


def check_reward(field_name: str, name: str) -> None:
    """A reward is a catalog name (``reward_models/<name>.yaml``) or a manifest file: the rule of
    :func:`diffalign.rewards.catalog.manifest_path`, checked without importing torch."""
    from .sandbox import REWARD_MODELS_DIR

    if not name:
        return  # an empty reward is refused where it is read, with its own message
    path = Path(os.path.expanduser(name))
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return
    if (Path(REWARD_MODELS_DIR) / f"{name}.yaml").is_file():
        return
    valid = sorted(p.stem for p in Path(REWARD_MODELS_DIR).glob("*.yaml"))
    raise ConfigError(
        f"config field {field_name}: unknown reward {name!r}: not a manifest file and not in the catalog "
        f"{REWARD_MODELS_DIR}; valid names: {', '.join(valid)}"
    )

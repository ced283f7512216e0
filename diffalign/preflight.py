"""Checks of what a configuration names on disk, run before anything heavy loads (no torch is imported here).

- :func:`check_paths`: the output directory, local model and dataset paths (a glob of Parquet files must match
  something), an explicit checkpoint to resume from;
- :func:`check_training_data`: a local Pick-a-Pic-format source of offline training: the training split's files have
  the columns pairs need, and the final evaluation's ``eval_split`` exists (it would otherwise fail only after the
  whole training);
- :func:`check_reward`: a reward is a catalog name or a manifest file;
- :func:`check_reward_weights`: the weight files of the rewards a run will load are on disk (the final
  evaluation's reward would otherwise fail after the whole training, before the export);
- :func:`check_resolution`: ``resolution`` is a multiple of the pipeline's VAE downsampling factor;
- :func:`check_hub_model_cached`: offline (``HF_HUB_OFFLINE=1``), a hub model id is already in the local cache;
- :func:`check_optional_packages`: the package behind an optional setting (8-bit AdamW, xformers, a tracker) is
  installed.

Each raises :class:`~diffalign.errors.ConfigError` (or its subclass ``SchemaError``) with one line naming the field,
file or split and what to do; the scripts print it as such.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data.splits import is_glob
from .errors import ConfigError


def looks_local(value: str) -> bool:
    """A path rather than a hub id ``owner/name``: absolute, relative with ./ or ~, or with more than one ``/``."""
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or os.sep != "/" and os.sep in value


def check_paths(cfg: Any) -> None:
    """``output_dir`` is not a file; a local ``pretrained_model`` / ``dataset`` exists (named sandbox ones and hub ids
    pass); a ``dataset`` glob matches a file; ``resolution`` fits the VAE; the optional packages of the settings are
    installed; the rewards the run loads have their weights; offline, a hub model id is cached; an explicit
    ``resume_from_checkpoint`` is a directory."""
    from .config import NAMED_DATASETS, NAMED_MODELS

    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"config field output_dir={cfg.output_dir!r} is a file: give a directory")
    for name, named in (("pretrained_model", NAMED_MODELS), ("dataset", NAMED_DATASETS)):
        value = getattr(cfg, name)
        if name == "dataset" and is_glob(value):  # a glob of Parquet files
            if not glob.glob(os.path.expanduser(value)):
                raise ConfigError(
                    f"config field dataset={value!r}: no file matches this pattern; check the path"
                )
            continue
        if value not in named and not Path(os.path.expanduser(value)).exists() and looks_local(value):
            raise ConfigError(
                f"config field {name}={value!r}: no such local directory (a hub id is 'owner/name'); check the path"
            )
    check_resolution(cfg.resolution, cfg.pretrained_model)
    check_optional_packages(cfg)
    if not cfg.skip_eval:
        check_reward_weights("eval_reward", cfg.eval_reward)
    if getattr(cfg, "reward", None):  # the online loop's training reward
        check_reward_weights("reward", cfg.reward)
    model = cfg.pretrained_model
    if model not in NAMED_MODELS and not looks_local(model) and not Path(model).exists():
        check_hub_model_cached(model, getattr(cfg, "revision", None))
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
    from .config import NAMED_DATASETS, PPD_DATASETS
    from .data.schema import PAIR_REQUIRED_COLUMNS
    from .data.splits import check_pair_source
    from .objectives.registry import get_objective

    personal = get_objective(cfg.objective).conditioning == "user"
    if personal:
        check_user_encoder(cfg.params.user_encoder)
    ppd_build = cfg.dataset in PPD_DATASETS or (Path(cfg.dataset) / "users.json").is_file()
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
    if is_glob(cfg.dataset) or cfg.dataset.endswith(".parquet"):
        raise ConfigError(
            f"config field dataset={cfg.dataset!r} names Parquet files, which are one split: the final evaluation's "
            f"eval_split {cfg.eval_split!r} would read the training captions. Put the files in a directory in the Hub "
            f"layout (data/<split>-00000-of-00001.parquet, with a {cfg.eval_split} split), or set skip_eval true"
        )
    if not personal:
        check_pair_source(cfg.dataset, cfg.eval_split, ("caption",))


def reward_names(catalog_dir: str | os.PathLike) -> list[str]:
    """Names of the manifests in a reward catalog (``reward_models/*.yaml``), sorted."""
    return sorted(p.stem for p in Path(catalog_dir).glob("*.yaml"))


def reward_manifest(name_or_path: str | os.PathLike, catalog_dir: str | os.PathLike | None = None) -> Path:
    """The manifest file of a catalog name (``"pickscore"`` -> ``<catalog>/pickscore.yaml``) or of a manifest path
    (``.yaml``, ``.yml``, ``.json``); the catalog is ``reward_models/`` unless given. Raises ConfigError listing the
    catalog's names. :func:`diffalign.rewards.catalog.manifest_path` is this function."""
    if catalog_dir is None:
        from .sandbox import REWARD_MODELS_DIR as catalog_dir
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        return p
    candidate = Path(catalog_dir) / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"unknown reward {str(name_or_path)!r}: not a manifest file and not in the catalog {catalog_dir}; "
        f"valid names: {', '.join(reward_names(catalog_dir))}"
    )


WEIGHTS_ENV = "DIFFALIGN_REWARD_WEIGHTS"


class MissingWeightsError(FileNotFoundError):
    """A manifest's weight file or directory is not on disk (diffalign never downloads it)."""


def weight_search_dirs(manifest: dict[str, Any], weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders a relative weight path is looked up in, in order: ``weights_dir``, each entry of
    ``$DIFFALIGN_REWARD_WEIGHTS``, the manifest's own folder."""
    dirs = [Path(weights_dir)] if weights_dir is not None else []
    dirs += [Path(d) for d in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if d]
    dirs.append(Path(manifest["_path"]).parent)
    return dirs


def resolve_weights(
    manifest: dict[str, Any], weights_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Absolute path of every weight entry; :class:`MissingWeightsError` for the first one not found."""
    resolved = {}
    for key, entry in manifest["weights"].items():
        rel = Path(os.path.expanduser(str(entry["path"])))
        candidates = (
            [rel] if rel.is_absolute() else [d / rel for d in weight_search_dirs(manifest, weights_dir)]
        )
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            tried = "\n  ".join(str(c) for c in candidates)
            get = f"\nHow: {entry['get']}" if entry.get("get") else ""
            raise MissingWeightsError(
                f"reward {manifest['name']!r}: weights '{key}' ({entry['path']}) not found. Tried:\n  {tried}\n"
                f"Get it from: {entry['source']}{get}\n"
                f"Put it at {candidates[-1]} (or under a folder given as weights_dir= / ${WEIGHTS_ENV}). "
                "diffalign never downloads weights."
            )
        resolved[key] = found
    return resolved


def reward_spec_names(spec: str) -> list[str]:
    """The reward names of a config value: one name, or a weighted sum ``'name:weight,name:weight'``."""
    return [part.partition(":")[0].strip() for part in spec.split(",") if part.strip()]


def check_reward_weights(field_name: str, spec: str) -> None:
    """The weight files of every reward ``spec`` names are on disk, components of a ``combined`` manifest included;
    raises :class:`MissingWeightsError` (prefixed by the field) for the first missing one. A malformed manifest is
    passed over here: loading it says what is wrong."""
    import yaml

    pending = [reward_manifest(name) for name in reward_spec_names(spec or "")]
    seen: set[Path] = set()
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            continue
        if data.get("kind") == "combined":
            components = (data.get("params") or {}).get("components") or []
            pending += [
                reward_manifest(c["reward"]) for c in components if isinstance(c, dict) and "reward" in c
            ]
            continue
        weights = data.get("weights") or {}
        if not isinstance(weights, dict) or not all(
            isinstance(w, dict) and "path" in w for w in weights.values()
        ):
            continue
        manifest = {"name": data.get("name", path.stem), "weights": weights, "_path": path}
        try:
            resolve_weights(manifest)
        except MissingWeightsError as err:
            raise MissingWeightsError(f"config field {field_name}: {err}") from None


def check_user_encoder(name: str) -> None:
    """PPD's frozen pair encoder is on disk: ``vlm:<directory>``, a CLIP directory, or a CLIP reward of the catalog
    (a name or manifest) with its weights; ``sandbox-attributes`` is built in."""
    if name == "sandbox-attributes" or Path(os.path.expanduser(name)).is_dir():
        return
    if name.startswith("vlm:"):
        if not Path(os.path.expanduser(name[4:])).is_dir():
            raise ConfigError(
                f"config field user_encoder={name!r}: no such directory {name[4:]!r}; diffalign never downloads "
                "weights: download the model (e.g. `hf download <hub id> --local-dir <dir>`) and give vlm:<dir>"
            )
        return
    if ("/" in name or name.startswith((".", "~"))) and Path(name).suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"config field user_encoder={name!r}: no such directory; give a CLIP directory, a CLIP reward of the "
            "catalog (e.g. sandbox-clip), vlm:<directory> or sandbox-attributes"
        )
    check_reward("user_encoder", name)
    check_reward_weights("user_encoder", name)


def check_reward(field_name: str, name: str) -> None:
    """A config field naming a reward names a catalog entry or a manifest file (:func:`reward_manifest`)."""
    if not name:
        return  # an empty reward is refused where it is read, with its own message
    try:
        reward_manifest(name)
    except ConfigError as err:
        raise ConfigError(f"config field {field_name}: {err}") from None


def vae_downsampling(vae_config: Mapping[str, Any]) -> int:
    """How many pixels one latent pixel spans per side: 2 ** (number of VAE blocks - 1) (SD1.x/SDXL: 8, sandbox: 4)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(
    resolution: int, pretrained_model: str, vae_config: Mapping[str, Any] | None = None
) -> None:
    """``resolution`` is a multiple of the VAE's downsampling factor: otherwise images are encoded to latents that
    cover fewer pixels than asked, and sampling draws images of another size. The VAE's ``config.json`` is read from
    the pipeline directory (a named sandbox model or a local path); pass ``vae_config`` once it is loaded (hub ids)."""
    if vae_config is None:
        from .config import NAMED_MODELS

        if pretrained_model in NAMED_MODELS:  # sandbox-4step shares the sandbox's VAE
            from .sandbox import SANDBOX_PIPELINE as root
        else:
            root = Path(os.path.expanduser(pretrained_model))
        config_file = root / "vae" / "config.json"
        if not config_file.is_file():
            return  # a hub id: checked once the VAE is loaded
        import json

        vae_config = json.loads(config_file.read_text())
    factor = vae_downsampling(vae_config)
    if resolution % factor:
        below = max(factor, resolution - resolution % factor)
        raise ConfigError(
            f"config field resolution={resolution} is not a multiple of {factor}, the downsampling factor of the VAE "
            f"of {pretrained_model!r}: give a multiple of {factor}, e.g. {below} or {below + factor}"
        )


def check_hub_model_cached(repo_id: str, revision: str | None = None) -> None:
    """With ``HF_HUB_OFFLINE=1`` a hub pipeline id can only load from the local Hugging Face cache: refuse one that is
    not there now, rather than after the libraries have loaded. Online, nothing is checked (it may download)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    if isinstance(try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str):
        return
    raise ConfigError(
        f"config field pretrained_model={repo_id!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"HF_HUB_OFFLINE=1 forbids downloading it: download it where there is network (`hf download {repo_id}`) "
        "or point pretrained_model at a local pipeline directory"
    )


#: (config field, value) -> (module that value needs, the pip extra or requirement that installs it)
OPTIONAL_PACKAGES = {
    ("optimizer", "adamw8bit"): ("bitsandbytes", "pip install 'diffalign[bnb]'"),
    ("attention", "xformers"): ("xformers", "pip install 'diffalign[xformers]' on a CUDA machine"),
    ("report_to", "wandb"): ("wandb", "pip install 'diffalign[wandb]'"),
    ("report_to", "tensorboard"): ("tensorboard", "pip install tensorboard"),
}


def check_optional_packages(cfg: Any) -> None:
    """A setting that needs an optional package names it when it is not installed: otherwise 8-bit AdamW and xformers
    fail after the models load, and accelerate drops a missing tracker with only a warning (the run then logs
    nothing where it was asked to)."""
    import importlib.util

    for (name, value), (module, how) in OPTIONAL_PACKAGES.items():
        if getattr(cfg, name, None) == value and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"config field {name}={value!r} needs the {module} package, which is not installed: {how}"
            )

"""Typed configuration: dataclasses loaded from YAML, with command-line overrides.

Every field carries a one-line help text (``field(metadata={"help": ...})``) which becomes its ``--flag`` help.
Precedence: dataclass default < YAML file (``--config``) < command-line flag.

    cfg = parse_config(TrainConfig, ["--config", "configs/sandbox_dpo.yaml", "--max_train_steps", "10"])

The method's own hyperparameters (``beta`` for Diffusion-DPO, ...) live in the dataclass its objective declares
(:mod:`diffalign.objectives.registry`); they are flat keys and flags like every other field, stored in
``cfg.params`` and readable as ``cfg.beta``. Every mistake a config can hold is a :class:`~diffalign.errors.ConfigError`
naming the field or file, raised here, before any model or data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .preflight import check_reward

#: dataset names diffalign.data.sources.resolve_dataset maps to a directory (not a path, not a hub id)
#: the named builds that carry simulated users (users.json), for the personalised objectives
PPD_DATASETS = ("sandbox-ppd", "sandbox-ppd-6u")
NAMED_DATASETS = ("sandbox", *PPD_DATASETS)
#: model names diffalign.models.pipeline.resolve_model_path maps to a pipeline directory (the base; the distilled model)
NAMED_MODELS = ("sandbox", "sandbox-4step")

#: diffusers' learning-rate schedules (diffusers.optimization.SchedulerType; a test keeps this list in sync).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


def _help(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: json.loads(json.dumps(value)), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class CommonConfig:
    """What every training loop shares: model, objective, optimisation, bookkeeping, final evaluation."""

    # ---- model -----------------------------------------------------------------------------------------------
    pretrained_model: str = _help(
        "diffusers pipeline directory or hub id; 'sandbox' = the shipped sandbox pipeline", "sandbox"
    )
    revision: str | None = _help("model revision (hub models only)", None)
    variant: str | None = _help("weights variant, e.g. 'fp16' (hub models only)", None)
    finetune: str = _help(
        "'lora' (reference = same network with adapters disabled) or 'full' (frozen copy)", "lora"
    )
    lora_rank: int = _help("LoRA rank", 8)
    lora_alpha: float | None = _help("LoRA alpha (default: equal to the rank, i.e. scale 1)", None)
    lora_target_modules: list[str] = _help(
        "UNet modules that get LoRA adapters", ["to_q", "to_k", "to_v", "to_out.0"]
    )
    reference_dtype: str = _help(
        "dtype of the frozen reference copy for full fine-tuning (float32/float16/bfloat16)", "float32"
    )
    gradient_checkpointing: bool = _help("trade compute for memory in the UNet", False)
    channels_last: bool = _help(
        "UNet weights and inputs in channels-last memory format (faster convolutions on some hardware; "
        "scripts/profile_step.py measures it)",
        False,
    )
    attention: str = _help(
        "'auto' (xformers on CUDA when installed, else PyTorch SDPA), 'sdpa' or 'xformers'", "auto"
    )

    # ---- data ----------------------------------------------------------------------------------------------
    dataset: str = _help(
        "Pick-a-Pic-schema data (offline training pairs; evaluation prompts by eval_split): local Parquet directory, "
        "hub dataset name, or 'sandbox' (shipped data)",
        "sandbox",
    )
    resolution: int = _help("training resolution in pixels (sandbox: 32; SD1.5: 512; SDXL: 1024)", 32)

    # ---- objective (its own hyperparameters come from its registry entry) -------------------------------------
    objective: str = _help(
        "the method, from the objective registry: 'dpo' (Diffusion-DPO) or 'sft' (denoising loss on winners)",
        "dpo",
    )

    # ---- optimisation ----------------------------------------------------------------------------------------
    train_batch_size: int = _help("pairs per device per micro-batch", 8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    max_train_steps: int = _help("optimizer steps", 200)
    learning_rate: float = _help("peak learning rate (per pair if scale_lr)", 1e-4)
    scale_lr: bool = _help(
        "paper rule: lr = learning_rate × effective batch in pairs (paper: 1e-8 × 2048 = 2.048e-5)", False
    )
    lr_scheduler: str = _help(
        "diffusers scheduler name: constant, constant_with_warmup, cosine, linear, ...",
        "constant_with_warmup",
    )
    lr_warmup_steps: int = _help("warm-up steps (paper: 500 SD1.5, 200 SDXL)", 20)
    optimizer: str = _help("adamw, adamw8bit (bitsandbytes) or adafactor", "adamw")
    adam_beta1: float = _help("AdamW β1", 0.9)
    adam_beta2: float = _help("AdamW β2", 0.999)
    adam_weight_decay: float = _help("AdamW weight decay", 1e-2)
    adam_epsilon: float = _help("AdamW ε", 1e-8)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)
    seed: int = _help("seed for initialisation, data order, timesteps and noise", 0)
    mixed_precision: str | None = _help(
        "'no', 'fp16' or 'bf16'; default: what `accelerate launch` / its config says", None
    )
    nonfinite_loss: str = _help(
        "a NaN/inf loss: 'error' stops the run naming the step; 'skip' drops that step's update (counted)",
        "error",
    )
    deterministic: bool = _help(
        "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN without autotuning): bit-identical "
        "reruns and resumes on CUDA, somewhat slower; CPU runs are deterministic either way",
        False,
    )

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    output_dir: str = _help("where checkpoints, logs, exports and eval.json go", "outputs/dpo-sandbox")
    checkpointing_steps: int = _help("write a checkpoint every N steps (0: only at the end)", 50)
    checkpoints_total_limit: int | None = _help("keep only the last K checkpoints", 2)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint directory to resume from", None)
    report_to: str = _help("accelerate trackers: tensorboard, wandb, all, none", "tensorboard")
    logging_steps: int = _help("log metrics every N steps", 5)
    validation_steps: int = _help("write validation images every N steps (0 disables)", 100)
    validation_prompts: list[str] = _help(
        "fixed prompts for validation images",
        ["a large red circle on the left", "a small blue triangle on a white background", "a green cross"],
    )
    validation_seeds: list[int] = _help("fixed seeds for validation images", [0, 1])

    # ---- evaluation at the end -------------------------------------------------------------------------------
    eval_split: str = _help(
        "prompts for the final base-vs-aligned evaluation (Pick-a-Pic protocol; for eval_prompts "
        "'sandbox-grammar': test_unique or validation_unique, disjoint sets of eval_num_prompts captions)",
        "test_unique",
    )
    eval_num_prompts: int | None = _help("limit the number of evaluation prompts (None: all)", None)
    eval_seeds: list[int] = _help("seeds per prompt, identical for base and aligned", [0, 1])
    eval_steps: int = _help("sampling steps for evaluation images", 20)
    eval_guidance: float = _help("classifier-free guidance for evaluation images", 5.0)
    eval_reward: str = _help(
        "reward (catalog name) that decides wins; 'sandbox-judge' on the sandbox", "sandbox-judge"
    )
    eval_batch_size: int = _help("images generated per batch during evaluation", 64)
    skip_eval: bool = _help("do not run the final evaluation", False)

    params: Any = field(
        default=None,
        metadata={"help": "the objective's hyperparameters (its registry dataclass)", "cli": False},
    )

    def __post_init__(self) -> None:
        from .objectives.registry import get_objective

        spec = get_objective(self.objective)
        if self.params is None:
            self.params = spec.params()
        elif not isinstance(self.params, spec.params):
            raise ConfigError(
                f"params must be a {spec.params.__name__} for objective {self.objective!r}, "
                f"got {type(self.params).__name__}"
            )
        _check_choice("finetune", self.finetune, ("lora", "full"))
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("nonfinite_loss", self.nonfinite_loss, ("error", "skip"))
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check_choice("optimizer", self.optimizer, ("adamw", "adamw8bit", "adafactor"))
        _check_choice("attention", self.attention, ("auto", "sdpa", "xformers"))
        _check_choice("reference_dtype", self.reference_dtype, ("float32", "float16", "bfloat16"))
        check_reward("eval_reward", self.eval_reward)
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "logging_steps",
                     "lora_rank", "resolution"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"config field {name} must be >= 0 (0 disables it), got {getattr(self, name)}"
                )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(
                f"config field checkpoints_total_limit must be >= 1 or none, got {self.checkpoints_total_limit}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"config field learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(
                f"config field max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"
            )
        if not self.eval_seeds:
            raise ConfigError("config field eval_seeds is empty: give at least one seed, e.g. [0, 1]")

    def __getattr__(self, name: str) -> Any:
        # The objective's hyperparameters read like fields: cfg.beta == cfg.params.beta.
        params = self.__dict__.get("params")
        if params is not None and name in {f.name for f in dataclasses.fields(params)}:
            return getattr(params, name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def check_paths(self) -> None:
        """File-system checks that need no model: run before anything heavy is loaded (:mod:`diffalign.preflight`)."""
        from .preflight import check_paths

        check_paths(self)


@dataclass
class TrainConfig(CommonConfig):
    """Preference training of a text-to-image diffusion model (Diffusion-DPO, its SFT baseline, and every method
    in the objective registry) on offline preference pairs."""

    # ---- training data ------------------------------------------------------------------------------------------------
    split: str = _help("dataset split to train on", "train")
    streaming: bool = _help("stream the dataset instead of loading it (hub datasets; disables caches)", False)
    tie_policy: str = _help("what to do with tied pairs (label 0.5/0.5): 'drop' (paper) or 'keep'", "drop")
    max_train_samples: int | None = _help("use only the first N usable pairs (debugging, small runs)", None)
    random_crop: bool = _help("random instead of centre crop (same crop for both images of a pair)", False)
    random_flip: bool = _help("random horizontal flip (same flip for both images of a pair)", True)
    prompt_dropout: float = _help("probability of replacing a caption by '' (official code: 0.2)", 0.0)
    use_cache: bool = _help("cache VAE latents and text embeddings on disk (see cache_mode)", True)
    cache_mode: str = _help(
        "'lazy': record each pair's encoding the first time training meets it and read it back later (never "
        "slower than encoding on the fly); 'upfront': encode the whole split, both orientations, before the "
        "first step",
        "lazy",
    )
    cache_dir: str | None = _help("where caches live (default: <output_dir>/../.cache/diffalign)", None)
    cache_batch_size: int = _help(
        "pairs per encoder call while building the cache (4 images each: winner, loser, both flipped); "
        "lower it if the build runs out of memory",
        16,
    )
    cache_dtype: str = _help(
        "storage dtype of cached latents and text embeddings: float16 (half the disk, <=4.9e-4 relative error) "
        "or float32 (exact)",
        "float16",
    )
    dataloader_num_workers: int = _help("data-loading worker processes", 0)
    reference_cache: bool = _help(
        "store the frozen reference's per-image errors (keyed by model, data, seed, epoch and pair) next to the "
        "latent cache and reuse them in later runs with the same key: they skip the reference forward "
        "(beta / lr / loss-type sweeps, reruns, resumes); exact, and free to fill",
        True,
    )
    eval_curve_steps: list[int] = _help(
        "also run the evaluation after these steps (same prompts, seeds and judge as the final one; base images "
        "generated once): each point goes to <output_dir>/eval_curve/step-N/eval.json and a line of "
        "eval_curve.jsonl with the training wall-clock so far; the final evaluation closes the curve",
        [],
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from .objectives.registry import get_objective

        if get_objective(self.objective).loop != "offline_pairs":
            raise ConfigError(
                f"objective {self.objective!r} is an online method (sample, score, update): train it with "
                "scripts/train_online.py"
            )
        _check_choice("tie_policy", self.tie_policy, ("drop", "keep"))
        _check_choice("cache_dtype", self.cache_dtype, ("float16", "float32"))
        _check_choice("cache_mode", self.cache_mode, ("lazy", "upfront"))
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"config field prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.streaming and self.use_cache:
            raise ConfigError(
                "config field streaming=true cannot be combined with use_cache=true: set use_cache false"
            )
        if self.cache_batch_size < 1:
            raise ConfigError(f"config field cache_batch_size must be >= 1, got {self.cache_batch_size}")
        check_run = getattr(self.params, "check_run", None)  # an objective's checks across run fields
        if check_run is not None:
            check_run(self)
        bad = [s for s in self.eval_curve_steps if not 0 < s <= self.max_train_steps]
        if bad:
            raise ConfigError(
                f"config field eval_curve_steps has {bad}: each step must be in [1, max_train_steps={self.max_train_steps}]"
            )
        if self.dataloader_num_workers < 0:
            raise ConfigError(
                f"config field dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}"
            )

    def check_paths(self) -> None:
        """The common checks, then a local Parquet source's splits and columns (:mod:`diffalign.preflight`)."""
        super().check_paths()
        from .preflight import check_training_data

        check_training_data(self)


#: The name this class had when Diffusion-DPO was the only method.
DPOConfig = TrainConfig


@dataclass
class OnlineConfig(CommonConfig):
    """Online preference training: each epoch samples images for prompts with the frozen current model (θ_old),
    scores them with a reward, and updates on the stored trajectories (PRDP, DDPO). Checkpoints, validation and
    logging count epochs."""

    objective: str = _help("the method, from the objective registry: 'prdp' or 'ddpo'", "prdp")
    output_dir: str = _help("where checkpoints, logs, exports and eval.json go", "outputs/prdp-sandbox")

    # ---- prompts -------------------------------------------------------------------------------------------
    prompts: str = _help(
        "training prompts: 'sandbox-grammar' (seeded sandbox captions), a .txt file (one per line), a "
        "PartiPrompts .tsv, HPSv2-style .json file(s)/directory, 'sandbox' or a Pick-a-Pic Parquet directory",
        "sandbox-grammar",
    )
    prompt_pool_size: int | None = _help(
        "sandbox-grammar: the number of distinct training prompts (None: unbounded, drawn fresh each epoch)",
        10000,
    )
    prompt_split: str = _help("split for Pick-a-Pic prompt sources", "train")
    eval_prompts: str | None = _help(
        "evaluation prompts: None = the eval_split of dataset; 'sandbox-grammar' = eval_num_prompts grammar "
        "captions of eval_split, excluded from the training prompts",
        None,
    )

    # ---- sampling and updates ------------------------------------------------------------------------------
    num_epochs: int = _help("epochs of sample -> score -> update", 100)
    prompts_per_epoch: int = _help("P: prompts sampled per epoch (over all processes)", 16)
    images_per_prompt: int = _help("N: images per prompt per epoch (PRDP pairs them within a prompt)", 4)
    updates_per_epoch: int = _help("K: passes over the epoch's samples before θ_old is refreshed", 1)
    train_batch_size: int = _help(
        "prompts per device per micro-batch (each with its images_per_prompt trajectories)", 4
    )
    timestep_fraction: float = _help("share of each trajectory's steps trained on (DDPO: 1.0)", 1.0)
    sample_steps: int = _help("sampling steps of the training trajectories", 20)
    sampler: str = _help(
        "training sampler: 'ddim' (DDIM with sample_eta > 0 on the model's schedule), 'ddpm' (ancestral; its last "
        "step is deterministic and not trained) or 'euler_ancestral' (distilled few-step models: the scheduler's own "
        "timesteps, e.g. 999/749/499/249 with trailing spacing; equal to DDIM with eta 1; last step not trained) or "
        "'lcm' (LCM / DMD2: x0 re-noised each step, DDIM with a per-step eta; last step not trained)",
        "ddim",
    )
    sample_eta: float = _help("DDIM eta of the training sampler (> 0; 1 = DDPM's ancestral variance)", 1.0)
    sample_guidance: float = _help("classifier-free guidance while sampling and training", 5.0)
    sample_batch_size: int = _help("images per sampling call", 64)
    reward: str = _help(
        "training reward: a catalog name (reward_models/*.yaml) or a weighted sum 'name:weight,name:weight'; "
        "never the judge that evaluates the run (a judge-trained run is a ceiling, not a result)",
        "sandbox-vp-score",
    )
    reward_control: str = _help(
        "'none', or 'permute': the null control - each prompt's rewards are shuffled among its images (a seeded "
        "permutation per (seed, epoch, prompt)), so the loop sees the same reward values with no information about "
        "which image earned them; a run's gain over its base counts only above this control's",
        "none",
    )
    max_train_steps: int = _help(
        "derived for the online loop (num_epochs x optimizer steps per epoch); a value given here is ignored",
        0,
    )
    track_every: int = _help(
        "every N epochs, score the current model on track_prompts held-out evaluation prompts with eval_reward "
        "(logged as heldout/<aspect>; 0 disables): the held-out curve next to the training reward",
        0,
    )
    track_prompts: int = _help("held-out prompts for track_every (the first ones of the evaluation set)", 64)
    checkpointing_steps: int = _help("write a checkpoint every N epochs (0: only at the end)", 10)
    validation_steps: int = _help("write validation images every N epochs (0 disables)", 20)
    logging_steps: int = _help("log metrics every N epochs", 1)
    eval_seeds: list[int] = _help("seeds per evaluation prompt, identical for base and aligned", [0])

    def __post_init__(self) -> None:
        self.max_train_steps = max(self.max_train_steps, 1)
        super().__post_init__()
        for name in ("num_epochs", "prompts_per_epoch", "images_per_prompt", "updates_per_epoch",
                     "sample_steps", "sample_batch_size", "track_prompts"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        _check_choice("sampler", self.sampler, ("ddim", "ddpm", "euler_ancestral", "lcm"))
        _check_choice("reward_control", self.reward_control, ("none", "permute"))
        if self.track_every < 0:
            raise ConfigError(
                f"config field track_every must be >= 0 (0 disables it), got {self.track_every}"
            )
        for part in (p for p in self.reward.split(",") if p.strip()):  # 'name' or 'name:weight,name:weight'
            check_reward("reward", part.partition(":")[0].strip())
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ConfigError(
                f"config field timestep_fraction must be in (0, 1], got {self.timestep_fraction}"
            )
        if not self.sample_eta > 0:
            raise ConfigError(
                f"config field sample_eta must be > 0 (a deterministic sampler has no log-probs), got {self.sample_eta}"
            )
        if self.prompt_pool_size is not None and self.prompt_pool_size < 1:
            raise ConfigError(
                f"config field prompt_pool_size must be >= 1 or none, got {self.prompt_pool_size}"
            )
        from .objectives.registry import get_objective

        spec = get_objective(self.objective)
        if spec.loop != "online":
            raise ConfigError(
                f"objective {self.objective!r} is an {spec.loop} method: train it with scripts/train_diffusion_dpo.py"
            )
        if self.images_per_prompt < spec.min_images_per_prompt:
            raise ConfigError(
                f"config field images_per_prompt={self.images_per_prompt}: objective {self.objective!r} compares "
                f"images of one prompt and needs at least {spec.min_images_per_prompt}"
            )
        if self.reward.split(":")[0] == "sandbox-judge" or any(
            part.split(":")[0].strip() == "sandbox-judge" for part in self.reward.split(",")
        ):
            print(
                f"warning: reward {self.reward!r} uses the sandbox judge, which also evaluates the run: the result "
                "is a ceiling (reward = evaluator), not evidence of alignment",
                file=sys.stderr,
            )


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"config field {name}={value!r} is not valid; choose one of {list(valid)}")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; ``list[str]`` stays."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _convert(name: str, tp: Any, raw: str) -> Any:
    tp = _base_type(tp)
    if raw.lower() in ("none", "null"):
        return None
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true/false, got {raw!r}")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        value = yaml.safe_load(raw) if raw.strip().startswith("[") else [s for s in raw.split(",") if s]
        return [item(v) for v in value]
    try:
        return tp(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--{name} expects {getattr(tp, '__name__', tp)}, got {raw!r}") from err


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem}); fix the file") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must contain a mapping of field: value, got {type(data).__name__}"
        )
    return data


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _method_params_cls(cls: type, objective: str | None) -> type | None:
    """The hyperparameter dataclass of ``objective`` when ``cls`` is a config with an objective field."""
    if "objective" not in {f.name for f in dataclasses.fields(cls)}:
        return None
    from .objectives.registry import get_objective

    name = objective or next(f.default for f in dataclasses.fields(cls) if f.name == "objective")
    return get_objective(name).params


def _other_objective_fields(names: list[str]) -> dict[str, list[str]]:
    """``{field: [objectives that declare it]}`` for the names that some registered objective declares."""
    from .objectives.registry import OBJECTIVE_MODULES, get_objective

    owners: dict[str, list[str]] = {}
    for o in sorted(OBJECTIVE_MODULES):
        declared = {f.name for f in dataclasses.fields(get_objective(o).params)}
        for name in names:
            if name in declared:
                owners.setdefault(name, []).append(o)
    return owners


def _unknown_field_error(
    source: str, unknown: list[str], valid: set[str], objective: str | None
) -> ConfigError:
    owners = _other_objective_fields(unknown)
    parts = []
    for name in unknown:
        if name in owners:
            parts.append(
                f"{name!r} belongs to objective {owners[name]}, not {objective!r}: remove it or change objective"
            )
            continue
        close = difflib.get_close_matches(name, sorted(valid), n=1)
        parts.append(f"{name!r} is not a field" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"{source}: " + "; ".join(parts) + " (see --help for the valid fields)")


def from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build ``cls`` from flat ``field: value`` pairs; the objective's own fields go to its params dataclass."""
    data = dict(data)
    names = {f.name for f in cli_fields(cls)}
    params_cls = _method_params_cls(cls, data.get("objective"))
    method_names = {f.name for f in dataclasses.fields(params_cls)} if params_cls else set()
    unknown = sorted(set(data) - names - method_names)
    if unknown and params_cls is not None:
        # A recipe's hyperparameters of another method (e.g. the DPO recipe run with objective sft): ignored, said.
        for name, owners in _other_objective_fields(unknown).items():
            print(f"{source}: ignoring {name}={data.pop(name)!r}: a hyperparameter of {owners}, not of "
                  f"{data.get('objective')!r}", file=sys.stderr)  # fmt: skip
        unknown = sorted(set(data) - names - method_names)
    if unknown:
        raise _unknown_field_error(source, unknown, names | method_names, data.get("objective"))
    try:
        if params_cls is not None:
            data["params"] = params_cls(**{k: data.pop(k) for k in list(data) if k in method_names})
        return cls(**data)
    except ConfigError:
        raise
    except TypeError as err:  # e.g. a YAML list where a number belongs
        raise ConfigError(f"{source}: {err}") from err
    except ValueError as err:  # a __post_init__ check; its message names the field
        raise ConfigError(str(err) if source == "config" else f"{source}: {err}") from err


def build_parser(
    cls: type, description: str | None = None, params_cls: type | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", default=None, help="YAML file with field: value pairs")
    parser.add_argument(
        "--debug", action="store_true", help="show Python tracebacks for configuration errors"
    )
    for klass, fields in (
        (cls, cli_fields(cls)),
        (params_cls, dataclasses.fields(params_cls) if params_cls else []),
    ):
        if not fields:
            continue
        group = (
            parser
            if klass is cls
            else parser.add_argument_group(f"objective hyperparameters ({klass.__name__})")
        )
        hints = typing.get_type_hints(klass)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(
                f"--{f.name}",
                default=None,
                metavar=getattr(_base_type(hints[f.name]), "__name__", "VALUE").upper(),
                help=f"{f.metadata.get('help', '')} (default: {default!r})",
            )
    return parser


def normalise_flags(argv: list[str]) -> list[str]:
    """``--num-prompts 5`` / ``--num-prompts=5`` -> ``--num_prompts ...``: dashes and underscores both work."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """Defaults < ``--config`` YAML < command-line flags, validated by the dataclass' ``__post_init__``.
    Flags may be spelled with dashes or underscores. Raises :class:`ConfigError` (one line for people)."""
    argv = normalise_flags(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--objective", default=None)
    known, _ = pre.parse_known_args(argv)
    data: dict[str, Any] = load_yaml(known.config) if known.config else {}
    objective = known.objective or data.get("objective")
    params_cls = _method_params_cls(cls, objective)
    parser = build_parser(cls, params_cls=params_cls)
    args, rest = parser.parse_known_args(argv)
    source = args.config or "config"
    if rest:
        flags = [r[2:].partition("=")[0] for r in rest if r.startswith("--")]
        if not flags:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        valid = {f.name for f in cli_fields(cls)} | (
            {f.name for f in dataclasses.fields(params_cls)} if params_cls else set()
        )
        raise _unknown_field_error("command line", flags, valid, objective)
    hints = {**(typing.get_type_hints(params_cls) if params_cls else {}), **typing.get_type_hints(cls)}
    for name, raw in vars(args).items():
        if name in ("config", "debug") or raw is None:
            continue
        try:
            data[name] = _convert(name, hints[name], raw)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Flat ``field: value`` (the objective's hyperparameters inline): what ``from_dict`` reads back."""
    out = {f.name: getattr(cfg, f.name) for f in cli_fields(type(cfg))}
    params = getattr(cfg, "params", None)
    if params is not None and dataclasses.is_dataclass(params):
        out.update(dataclasses.asdict(params))
    return json.loads(json.dumps(out))

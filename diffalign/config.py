"""Typed configuration: dataclasses loaded from YAML, with command-line overrides.

Every field carries a one-line help text (``field(metadata={"help": ...})``) which becomes its ``--flag`` help.
Precedence: dataclass default < YAML file (``--config``) < command-line flag.

    cfg = parse_config(DPOConfig, ["--config", "configs/sandbox_dpo.yaml", "--max_train_steps", "10"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _help(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: json.loads(json.dumps(value)), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class DPOConfig:
    """Diffusion-DPO (and SFT baseline) training on offline preference pairs."""

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
    attention: str = _help(
        "'auto' (xformers on CUDA when installed, else PyTorch SDPA), 'sdpa' or 'xformers'", "auto"
    )

    # ---- data ------------------------------------------------------------------------------------------------
    dataset: str = _help(
        "Pick-a-Pic-schema data: local Parquet directory, hub dataset name, or 'sandbox' (shipped data)",
        "sandbox",
    )
    split: str = _help("dataset split to train on", "train")
    streaming: bool = _help("stream the dataset instead of loading it (hub datasets; disables caches)", False)
    tie_policy: str = _help("what to do with tied pairs (label 0.5/0.5): 'drop' (paper) or 'keep'", "drop")
    max_train_samples: int | None = _help("use only the first N usable pairs (debugging, small runs)", None)
    resolution: int = _help("training resolution in pixels (sandbox: 32; SD1.5: 512; SDXL: 1024)", 32)
    random_crop: bool = _help("random instead of centre crop (same crop for both images of a pair)", False)
    random_flip: bool = _help("random horizontal flip (same flip for both images of a pair)", True)
    prompt_dropout: float = _help("probability of replacing a caption by '' (official code: 0.2)", 0.0)
    use_cache: bool = _help("precompute VAE latents and text embeddings once into on-disk shards", True)
    cache_dir: str | None = _help("where caches live (default: <output_dir>/../.cache/diffalign)", None)
    cache_batch_size: int = _help(
        "pairs per encoder call while building the cache (4 images each: winner, loser, both flipped); "
        "lower it if the build runs out of memory",
        16,
    )
    dataloader_num_workers: int = _help("data-loading worker processes", 0)

    # ---- objective -------------------------------------------------------------------------------------------
    objective: str = _help("'dpo' (Diffusion-DPO) or 'sft' (denoising loss on the winners only)", "dpo")
    loss_type: str = _help("DPO loss variant: sigmoid, hinge or ipo", "sigmoid")
    beta: float = _help("KL strength β in the official convention (paper: 2000-5000)", 5000.0)
    beta_convention: str = _help("'official' (Wallace et al. code) or 'diffusers' (β' = β/2)", "official")
    label_smoothing: float = _help("robust/conservative DPO label smoothing ε in [0, 0.5)", 0.0)

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
        "prompts for the final base-vs-aligned evaluation (Pick-a-Pic protocol)", "test_unique"
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

    def __post_init__(self) -> None:
        _check_choice("finetune", self.finetune, ("lora", "full"))
        _check_choice("objective", self.objective, ("dpo", "sft"))
        _check_choice("loss_type", self.loss_type, ("sigmoid", "hinge", "ipo"))
        _check_choice("beta_convention", self.beta_convention, ("official", "diffusers"))
        _check_choice("tie_policy", self.tie_policy, ("drop", "keep"))
        _check_choice("optimizer", self.optimizer, ("adamw", "adamw8bit", "adafactor"))
        _check_choice("attention", self.attention, ("auto", "sdpa", "xformers"))
        _check_choice("reference_dtype", self.reference_dtype, ("float32", "float16", "bfloat16"))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.streaming and self.use_cache:
            raise ValueError("streaming=True cannot be combined with use_cache=True: set use_cache false")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.max_train_steps < 1:
            raise ValueError("train_batch_size, gradient_accumulation_steps and max_train_steps must be >= 1")
        if self.cache_batch_size < 1:
            raise ValueError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"config field {name}={value!r} is not valid; choose one of {list(valid)}")


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
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must contain a mapping of field: value, got {type(data).__name__}"
        )
    return data


def from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", default=None, help="YAML file with field: value pairs")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(
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
    Flags may be spelled with dashes or underscores."""
    parser = build_parser(cls)
    args = parser.parse_args(normalise_flags(list(sys.argv[1:] if argv is None else argv)))
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    source = args.config or "config"
    hints = typing.get_type_hints(cls)
    for name, raw in vars(args).items():
        if name == "config" or raw is None:
            continue
        data[name] = _convert(name, hints[name], raw)
    return from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

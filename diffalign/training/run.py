"""What every training loop shares: the accelerator, the models (policy with LoRA or full, reference), the optimizer
and learning-rate schedule, and the LoRA checkpoint hooks. The offline-pairs loop (:mod:`.offline`) and the online
loop build on :func:`setup_run`; checkpoints, validation, export and evaluation are in :mod:`.checkpoint` and
:mod:`.outputs`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.profiler import record_function

from ..config import to_dict
from ..errors import TrainingError
from ..models import lora as lora_lib
from ..models import pipeline as mp
from ..objectives.registry import ObjectiveSpec
from ..preflight import check_resolution
from . import environment

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """The shared state of one training run (one per process)."""

    cfg: Any
    spec: ObjectiveSpec
    accelerator: Accelerator
    comps: mp.Components
    unet: torch.nn.Module  # replaced by the prepared (wrapped) module once the loop calls accelerator.prepare
    reference: Any  # context-manager factory yielding the reference network, or None
    weight_dtype: torch.dtype
    attention: str
    output_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrapped_unet(self) -> torch.nn.Module:
        model = self.accelerator.unwrap_model(self.unet)
        return getattr(model, "_orig_mod", model)


def enable_deterministic() -> None:
    """Deterministic kernels for bit-identical CUDA runs (cuBLAS needs its workspace fixed before its first use)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def frozen_dtype(is_vae: bool, sdxl: bool, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a frozen module (VAE, text encoders) under mixed precision: the compute dtype, except SDXL's VAE
    under fp16, which overflows to NaN in half precision and stays float32 (as in diffusers' SDXL training
    scripts; a fp16-safe VAE such as the "fp16-fix" one can be loaded as the pipeline's VAE instead)."""
    if is_vae and sdxl and weight_dtype == torch.float16:
        return torch.float32
    return weight_dtype


def setup_run(cfg, spec: ObjectiveSpec, project_name: str = "diffalign") -> Run:
    """Accelerator, components on the device, the trainable UNet (LoRA adapters or all weights) and the reference
    the spec asks for. Frozen modules are cast to the mixed-precision dtype, except SDXL's VAE under fp16, which
    produces NaNs in half precision (the diffusers SDXL training scripts keep it in float32 too)."""
    if cfg.deterministic:
        enable_deterministic()
    out = Path(cfg.output_dir)
    acc = Accelerator(
        # Without CUDA, say so: under a torchrun launch (several processes) accelerate then picks MULTI_CPU/gloo
        # instead of running each process as if it were alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(cfg.seed)
    comps = mp.load_components(cfg.pretrained_model, cfg.revision, cfg.variant)
    check_resolution(cfg.resolution, cfg.pretrained_model, comps.vae.config)  # hub ids: after loading
    weight_dtype = DTYPES.get(acc.mixed_precision, torch.float32)
    for m in comps.frozen_modules():
        m.to(acc.device)
        dtype = frozen_dtype(m is comps.vae, comps.sdxl, weight_dtype)
        if dtype != torch.float32:  # no cast otherwise: diffusers warns on no-op dtype casts
            m.to(dtype=dtype)
    unet = comps.unet
    attention = mp.set_attention_backend(unet.to(acc.device), cfg.attention)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if getattr(cfg, "channels_last", False):
        unet.to(memory_format=torch.channels_last)
    if cfg.finetune == "lora":
        # Frozen base weights in the compute dtype (the adapters stay float32), except under FSDP: it flattens
        # each wrapped block into one tensor, which needs one dtype, and casts to bf16/fp16 itself.
        if weight_dtype != torch.float32 and acc.distributed_type != DistributedType.FSDP:
            unet.to(dtype=weight_dtype)
        lora_lib.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        reference = lora_lib.AdapterDisabledReference(unet) if spec.needs_reference else None
    else:
        unet.requires_grad_(True)
        ref_dtype = lora_lib.DTYPES[cfg.reference_dtype]
        reference = lora_lib.FrozenCopyReference(unet, ref_dtype) if spec.needs_reference else None
    run = Run(cfg, spec, acc, comps, unet, reference, weight_dtype, attention, out)
    register_lora_hooks(run)
    return run


def build_optimizer(cfg, params, lr: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )  # fmt: skip
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "optimizer='adamw8bit' needs bitsandbytes: pip install 'diffalign[bnb]'"
            ) from err
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )  # fmt: skip
    from transformers.optimization import Adafactor

    # The SDXL recipe of the paper: Adafactor with an external learning rate (no relative step, no warm-up init).
    return Adafactor(
        params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
        weight_decay=cfg.adam_weight_decay,
    )  # fmt: skip


def build_optimization(run: Run, effective_batch: int):
    """``(optimizer, lr_scheduler, lr, num_trainable)`` over the UNet's trainable parameters; ``scale_lr``
    multiplies the learning rate by the effective batch (pairs per optimizer step)."""
    cfg, n = run.cfg, run.accelerator.num_processes
    lr = cfg.learning_rate * effective_batch if cfg.scale_lr else cfg.learning_rate
    params = [p for p in run.unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, lr)
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * n,
        num_training_steps=cfg.max_train_steps * n,
    )
    return optimizer, scheduler, lr, sum(p.numel() for p in params)


def all_finite(run: Run, loss: torch.Tensor) -> bool:
    """Whether every process's loss is finite (gathered, so all processes take the same branch)."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    return not bool(run.accelerator.gather(bad).sum() > 0)


def backward_and_step(run: Run, loss: torch.Tensor, optimizer, lr_scheduler, where: str) -> bool:
    """One micro-batch's update inside ``accelerator.accumulate``: backward of ``loss.mean()``, clipping and the
    optimizer/schedule step at accumulation boundaries. A non-finite loss on any process stops the run naming
    ``where`` (``nonfinite_loss: error``) or skips this micro-batch's gradient (``skip``; returns ``False``)."""
    cfg, acc = run.cfg, run.accelerator
    finite = all_finite(run, loss)
    if finite:
        with record_function("diffalign/backward"):
            acc.backward(loss.mean())
    elif cfg.nonfinite_loss == "error":
        raise TrainingError(
            f"non-finite loss at {where}: stopping; lower the learning rate, check the data, or set "
            "nonfinite_loss skip to drop such steps"
        )
    with record_function("diffalign/optimizer"):
        if acc.sync_gradients and cfg.max_grad_norm > 0 and finite:
            acc.clip_grad_norm_(run.unet.parameters(), cfg.max_grad_norm)
        optimizer.step()  # parameters without gradient (a skipped step) are left as they are
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return finite


def register_lora_hooks(run: Run) -> None:
    """LoRA checkpoints hold only the adapter weights (diffusers format), not a copy of the whole UNet."""
    if run.cfg.finetune != "lora":
        return
    acc, sdxl = run.accelerator, run.comps.sdxl

    def unwrap(model):
        model = acc.unwrap_model(model)
        return getattr(model, "_orig_mod", model)

    def save_hook(models, weights, output_dir):
        if acc.is_main_process:
            for model in models:
                lora_lib.save_lora(output_dir, unwrap(model), sdxl=sdxl)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / "pytorch_lora_weights.safetensors"))
        state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        while models:
            model = unwrap(models.pop())
            result = set_peft_model_state_dict(
                model, convert_unet_state_dict_to_peft(state), adapter_name="default"
            )
            if result is not None and getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"unexpected LoRA keys in {input_dir}: {result.unexpected_keys[:5]}")
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def start_outputs(run: Run, resumed: bool, tracker_project: str = "diffalign") -> None:
    """``config.json``, ``environment.json`` (one entry per start: :mod:`.environment`), trackers, and a fresh
    ``train_log.jsonl`` unless resuming (a resumed run appends)."""
    acc, cfg = run.accelerator, run.cfg
    if not acc.is_main_process:
        return
    run.output_dir.mkdir(parents=True, exist_ok=True)
    (run.output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    environment.record(run.output_dir, environment.describe(
        processes=acc.num_processes, mixed_precision=str(acc.mixed_precision),
        deterministic=bool(getattr(cfg, "deterministic", False)), resumed=resumed))  # fmt: skip
    if not resumed:
        (run.output_dir / "train_log.jsonl").write_text("")
    if cfg.report_to != "none":
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in to_dict(cfg).items()
        }
        acc.init_trackers(tracker_project, config=flat)


def append_log(run: Run, row: dict) -> None:
    """One line of ``train_log.jsonl``, flushed as training goes: a killed run leaves its log."""
    if run.accelerator.is_main_process:
        with open(run.output_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

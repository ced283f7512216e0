"""LoRA through peft, the reference-model strategies of Diffusion-DPO, and the export formats users load.

- LoRA: ``unet.add_adapter(LoraConfig(...))`` (diffusers' peft integration). The reference model is the same
  network with the adapters disabled, so no second UNet is held in memory.
- Full fine-tuning: the reference is a frozen copy of the initial UNet, optionally in low precision.
- Export: LoRA weights in the diffusers format that a stock ``pipe.load_lora_weights(dir)`` loads; a full UNet via
  ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None, target_modules: list[str]) -> None:
    """Freeze the UNet and attach trainable LoRA adapters (``lora_B`` initialised to zero: the model starts
    exactly at the base). ``alpha`` defaults to ``rank`` (scale 1)."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in float32 even under mixed precision


def has_lora(unet: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in unet.named_parameters())


class AdapterDisabledReference:
    """Reference = the policy network with its LoRA adapters disabled (LoRA fine-tuning).

    The switch sets each LoRA layer's ``_disable_adapters`` flag (what peft's forward reads) on a list of layers
    found once, and restores it. ``unet.disable_adapters()`` would do the same by walking every module and toggling
    ``requires_grad`` of every adapter weight, twice per step: on the sandbox UNet that walk alone cost 10-13 ms of
    a ~280 ms step (``scripts/profile_step.py``). The reference runs under ``no_grad``, so ``requires_grad`` need
    not change."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._layers: list | None = None

    def lora_layers(self) -> list:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            model = getattr(self.unet, "module", self.unet)  # unwrap DDP
            self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    @contextlib.contextmanager
    def __call__(self) -> Iterator[torch.nn.Module]:
        layers = self.lora_layers()
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            with torch.no_grad():
                yield self.unet
        finally:
            for layer, flag in zip(layers, before):
                layer._disable_adapters = flag


class FrozenCopyReference:
    """Reference = a frozen copy of the initial UNet, in ``dtype`` (full fine-tuning)."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype = torch.float32):
        self.ref = copy.deepcopy(unet).to(dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype

    @contextlib.contextmanager
    def __call__(self) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield self.ref


def lora_state_dict(
    unet: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in PEFT naming (``<module>.lora_A.weight`` / ``lora_B``), which diffusers'
    ``load_lora_weights`` reads natively for every layer type.

    Not ``convert_state_dict_to_diffusers``: it renames only attention projections to the old ``lora.down/up``
    style and leaves conv/feed-forward keys as ``lora_A/B``; with such a mix the stock loader silently drops the
    attention adapters (tested: every exported tensor must arrive in the loaded pipeline).

    ``state_dict``: the UNet's full state dict when the module itself holds only a shard (FSDP, DeepSpeed ZeRO-3:
    ``accelerator.get_state_dict(unet)``)."""
    return get_peft_model_state_dict(unet, state_dict=state_dict)


def save_lora(
    save_dir: str | Path,
    unet: torch.nn.Module,
    sdxl: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(save_dir)`` loads; the adapter's
    ``LoraConfig`` (rank, alpha, targets) travels as metadata so a non-default alpha is restored too.
    ``state_dict``: see :func:`lora_state_dict`."""
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in lora_state_dict(unet, state_dict).items()
    }
    model = getattr(unet, "module", unet)
    metadata = model.peft_config["default"].to_dict() if hasattr(model, "peft_config") else None
    if metadata is not None:
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipeline_cls.save_lora_weights(
        save_directory=str(save_dir),
        unet_lora_layers=state,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    return Path(save_dir) / "pytorch_lora_weights.safetensors"

"""The offline-pairs training loop: Diffusion-DPO, its SFT baseline, and any objective of the same shape.

A method plugs in as an entry of :data:`OBJECTIVES` (per-sample errors in, per-sample loss and metrics out); the
loop owns the accelerator, data, reference model, checkpoints, trackers, validation images, export and the final
evaluation. One process or many (accelerate: DDP, FSDP, DeepSpeed), the same code.

Randomness that decides the loss (timestep, noise, prompt dropout) is drawn per *pair* from a generator keyed by
(seed, epoch, dataset index): the same pair gets the same draws whatever the number of processes, the batch it lands
in, or an interruption and resume. That is what makes a 2-process run reproduce the 1-process loss curve and a resumed
run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import DPOConfig
from ..diffusion import noise as dn
from ..models import lora as lora_lib
from ..models import pipeline as mp
from ..objectives.dpo import diffusion_dpo_loss, sft_loss
from . import checkpoint as ck
from .data import build_train_data

# ---------------------------------------------------------------------------------------------------------------
# Objectives: name -> fn(model_err_w, model_err_l, ref_err_w, ref_err_l, cfg) -> (loss [B], metrics {name: [B]})


def _dpo(mw, ml, rw, rl, cfg: DPOConfig):
    return diffusion_dpo_loss(
        mw,
        ml,
        rw,
        rl,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        beta_convention=cfg.beta_convention,
    )


def _sft(mw, ml, rw, rl, cfg: DPOConfig):
    return sft_loss(mw)


OBJECTIVES = {"dpo": _dpo, "sft": _sft}
NEEDS_REFERENCE = {"dpo": True, "sft": False}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


# ---------------------------------------------------------------------------------------------------------------
# Per-pair randomness


def pair_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, dataset index); distinct keys give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def pair_randomness(
    indices: torch.Tensor, seed: int, epoch: int, latent_shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each pair: timestep ``[B]`` long, noise ``[B, *latent_shape]`` float32, dropout uniform ``[B]``.

    The winner and the loser of a pair share the timestep and the noise (Diffusion-DPO)."""
    ts, noises, us = [], [], []
    for idx in indices.tolist():
        g = torch.Generator().manual_seed(pair_seed(seed, epoch, int(idx)))
        ts.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noises.append(torch.randn((1, *latent_shape), generator=g))
        us.append(torch.rand((1,), generator=g))
    return torch.cat(ts), torch.cat(noises), torch.cat(us)


# ---------------------------------------------------------------------------------------------------------------


def _unwrap(accelerator: Accelerator, model):
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def _flat_config(cfg: DPOConfig) -> dict[str, Any]:
    """Trackers take scalars only."""
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in asdict(cfg).items()
    }


def build_optimizer(cfg: DPOConfig, params, lr: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "optimizer='adamw8bit' needs bitsandbytes: pip install 'diffalign[bnb]'"
            ) from err
        return bnb.optim.AdamW8bit(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
    from transformers.optimization import Adafactor

    # The SDXL recipe of the paper: Adafactor with an external learning rate (no relative step, no warm-up init).
    return Adafactor(
        params,
        lr=lr,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        weight_decay=cfg.adam_weight_decay,
    )


def enable_deterministic() -> None:
    """Deterministic kernels for bit-identical CUDA runs (cuBLAS needs its workspace fixed before its first use)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class OfflinePairsTrainer:
    """``setup()`` -> ``train()`` -> ``export()`` -> ``evaluate()``. The script calls them in order."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            enable_deterministic()
        self.accelerator = acc = Accelerator(
            # Without CUDA, say so: under a torchrun launch (several processes) accelerate then picks MULTI_CPU/gloo
            # instead of running each process as if it were alone.
            cpu=not torch.cuda.is_available(),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        set_seed(cfg.seed)
        self.comps = comps = mp.load_components(cfg.pretrained_model, cfg.revision, cfg.variant)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.weight_dtype = weight_dtype
        for m in comps.frozen_modules():
            m.to(acc.device)
            if weight_dtype != torch.float32:
                m.to(dtype=weight_dtype)
        unet = comps.unet
        self.attention = mp.set_attention_backend(unet.to(acc.device), cfg.attention)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        if cfg.finetune == "lora":
            # Frozen base weights in the compute dtype (the adapters stay float32), except under FSDP: it flattens
            # each wrapped block into one tensor, which needs one dtype, and casts to bf16/fp16 itself.
            if weight_dtype != torch.float32 and acc.distributed_type != DistributedType.FSDP:
                unet.to(dtype=weight_dtype)
            lora_lib.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            self.reference = lora_lib.AdapterDisabledReference(unet)
        else:
            unet.requires_grad_(True)
            ref_dtype = lora_lib.DTYPES[cfg.reference_dtype]
            self.reference = (
                lora_lib.FrozenCopyReference(unet, ref_dtype) if NEEDS_REFERENCE[cfg.objective] else None
            )
        self._register_lora_hooks()

        # ---- data (cached latents + text embeddings, or pixels encoded on the fly)
        self.data = build_train_data(cfg, comps, acc)
        self.empty_text = mp.encode_prompts(comps, [""])  # prompt dropout target

        # ---- optimisation
        num_processes = acc.num_processes
        self.effective_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes
        lr = cfg.learning_rate * self.effective_batch if cfg.scale_lr else cfg.learning_rate
        self.lr = lr
        params = [p for p in unet.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        optimizer = build_optimizer(cfg, params, lr)
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * num_processes,
            num_training_steps=cfg.max_train_steps * num_processes,
        )
        self.unet, self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            unet, optimizer, self.data.dataloader, lr_scheduler
        )
        self.alphas_cumprod = dn.scheduler_alphas_cumprod(comps.noise_scheduler).to(acc.device)
        self.objective = get_objective(cfg.objective)

        # ---- state and resume
        self.global_step, self.epoch, self.batches_in_epoch = 0, 0, 0
        resume = ck.resolve_resume(self.output_dir, cfg.resume_from_checkpoint)
        if resume is not None:
            acc.load_state(str(resume))
            st = ck.load_train_state(resume)
            self.global_step, self.epoch, self.batches_in_epoch = (
                st["global_step"],
                st["epoch"],
                st["batches_in_epoch"],
            )
            acc.print(
                f"resumed from {resume} at step {self.global_step} (epoch {self.epoch}, batch {self.batches_in_epoch})"
            )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            if cfg.report_to != "none":
                acc.init_trackers("diffalign-dpo", config=_flat_config(cfg))
        self._print_derived()

    def _print_derived(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        n = self.data.num_pairs
        steps_per_epoch = math.ceil(n / self.effective_batch) if n else float("nan")
        acc.print(
            "\n".join(
                [
                    "---- diffalign: offline preference training ----",
                    f"model            {self.comps.model_path} ({'SDXL' if self.comps.sdxl else 'SD1.x'}, {self.comps.prediction_type})",
                    f"objective        {cfg.objective} (loss {cfg.loss_type}, beta {cfg.beta} {cfg.beta_convention})",
                    f"fine-tuning      {cfg.finetune}: {self.num_trainable:,} trainable parameters; attention {self.attention}",
                    f"data             {n:,} usable pairs ({'cached latents' if self.data.cached else 'encoded on the fly'})",
                    f"effective batch  {cfg.train_batch_size} pairs x {cfg.gradient_accumulation_steps} accumulation x "
                    f"{acc.num_processes} processes = {self.effective_batch} pairs/step",
                    f"steps            {cfg.max_train_steps} ({steps_per_epoch} steps/epoch; "
                    f"{cfg.max_train_steps * self.effective_batch:,} pairs seen)",
                    f"learning rate    {self.lr:.3g} ({'scaled: ' + str(cfg.learning_rate) + ' x batch' if cfg.scale_lr else 'as given'}), "
                    f"{cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}",
                    f"mixed precision  {acc.mixed_precision}; device {acc.device}",
                    f"output           {self.output_dir}",
                ]
            )
        )

    def _register_lora_hooks(self) -> None:
        """LoRA checkpoints hold only the adapter weights (diffusers format), not a copy of the whole UNet."""
        if self.cfg.finetune != "lora":
            return
        acc = self.accelerator
        sdxl = self.comps.sdxl

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                for model in models:
                    lora_lib.save_lora(output_dir, _unwrap(acc, model), sdxl=sdxl)
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(str(Path(input_dir) / "pytorch_lora_weights.safetensors"))
            state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
            while models:
                model = _unwrap(acc, models.pop())
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

    # ---- one step --------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss ``[B]`` and metrics for one micro-batch of pairs."""
        cfg, comps, dev = self.cfg, self.comps, self.accelerator.device
        latents = batch["latents"] if "latents" in batch else None
        if latents is None:  # on the fly: encode winner and loser pixels
            pix = batch["pixel_values"]  # [B, 2, 3, H, W]
            B = pix.shape[0]
            latents = mp.encode_images(comps, pix.flatten(0, 1).to(dev)).unflatten(0, (B, 2))
            text = mp.encode_prompts(comps, list(batch["captions"]))
        else:
            text = {k: v.to(dev) for k, v in batch["text"].items()}
        latents = latents.to(dev, torch.float32)
        B = latents.shape[0]
        x0 = torch.cat([latents[:, 0], latents[:, 1]], dim=0)  # [2B, C, h, w]: winners then losers

        t, noise, u = pair_randomness(
            batch["index"],
            cfg.seed,
            int(batch.get("epoch", self.epoch)),
            tuple(x0.shape[1:]),
            len(self.alphas_cumprod),
        )
        t, noise, u = t.to(dev), noise.to(dev), u.to(dev)
        if cfg.prompt_dropout > 0:  # replace captions by "" for a share of pairs (same for winner and loser)
            drop = u < cfg.prompt_dropout
            text = {
                k: torch.where(
                    drop.view(-1, *[1] * (v.dim() - 1)), self.empty_text[k].to(dev, v.dtype).expand_as(v), v
                )
                for k, v in text.items()
            }
        t2, noise2 = dn.repeat_for_pair(t), dn.repeat_for_pair(noise)
        text2 = {k: dn.repeat_for_pair(v) for k, v in text.items()}
        noisy = dn.add_noise(x0, noise2, t2, self.alphas_cumprod)
        target = dn.prediction_target(x0, noise2, t2, self.alphas_cumprod, comps.prediction_type)
        added = mp.unet_added_cond(
            comps,
            text2,
            _pair_rows(batch.get("original_sizes")),
            _pair_rows(batch.get("crop_top_lefts")),
            cfg.resolution,
        )
        dtype = self.weight_dtype
        pred = self.unet(
            noisy.to(dtype),
            t2,
            encoder_hidden_states=text2["prompt_embeds"].to(dtype),
            added_cond_kwargs=added,
        ).sample
        model_err_w, model_err_l = dn.split_pair(dn.per_sample_mse(pred, target))
        if NEEDS_REFERENCE[cfg.objective]:
            with self.reference() as ref:
                ref_pred = ref(
                    noisy.to(dtype),
                    t2,
                    encoder_hidden_states=text2["prompt_embeds"].to(dtype),
                    added_cond_kwargs=added,
                ).sample
            ref_err_w, ref_err_l = dn.split_pair(dn.per_sample_mse(ref_pred, target))
        else:
            ref_err_w = ref_err_l = torch.zeros_like(model_err_w)
        return self.objective(model_err_w, model_err_l, ref_err_w, ref_err_l, cfg)

    # ---- loop ------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        progress = tqdm(
            total=cfg.max_train_steps,
            initial=self.global_step,
            desc="train",
            disable=not acc.is_local_main_process,
        )
        history: list[dict] = []
        log_buf: dict[str, list[torch.Tensor]] = {}
        t0 = time.time()
        t_log, steps_since_log = None, 0  # throughput window (starts after the first step: warm-up excluded)
        self.unet.train()
        if self.global_step == 0 and cfg.validation_steps > 0:
            self.validate()
        while self.global_step < cfg.max_train_steps:
            self.data.set_epoch(self.epoch)
            loader = self.dataloader
            if self.batches_in_epoch:
                loader = acc.skip_first_batches(self.dataloader, self.batches_in_epoch)
            # accelerate's loaders call sampler.set_epoch(their own iteration count) when iterated; a loader made
            # after a resume would count from 0, so tell it the true epoch.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)
            for batch in loader:
                batch["epoch"] = self.epoch
                self.data.count(batch)
                with acc.accumulate(self.unet):
                    loss, metrics = self.compute_loss(batch)
                    acc.backward(loss.mean())
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.batches_in_epoch += 1
                # Metrics are gathered across processes before they become Python numbers.
                for k, v in {"loss": loss, **metrics}.items():
                    log_buf.setdefault(k, []).append(acc.gather(v.detach().float().reshape(-1)))
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                progress.update(1)
                steps_since_log += 1
                if t_log is None:
                    t_log, steps_since_log = time.perf_counter(), 0
                if self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_train_steps:
                    logs = self._reduce_logs(log_buf)
                    logs["train/lr"] = self.lr_scheduler.get_last_lr()[0]
                    logs["train/step"] = self.global_step
                    if steps_since_log:
                        elapsed = time.perf_counter() - t_log
                        logs["perf/pairs_per_s"] = steps_since_log * self.effective_batch / elapsed
                        logs["perf/seconds_per_step"] = elapsed / steps_since_log
                        t_log, steps_since_log = time.perf_counter(), 0
                    history.append(logs)
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    if cfg.report_to != "none":
                        acc.log(logs, step=self.global_step)
                    log_buf = {}
                if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.validation_steps and self.global_step % cfg.validation_steps == 0:
                    self.validate()
                if self.global_step >= cfg.max_train_steps:
                    break
            else:  # the epoch ran out
                self.epoch += 1
                self.batches_in_epoch = 0
        progress.close()
        if not cfg.checkpointing_steps or self.global_step % cfg.checkpointing_steps:
            self.save_checkpoint()
        summary = {"steps": self.global_step, "train_seconds": time.time() - t0, "history": history}
        if acc.is_main_process:
            with open(self.output_dir / "train_log.jsonl", "a") as f:
                for row in history:
                    f.write(json.dumps(row) + "\n")
        self.data.report(acc)
        return summary

    def _reduce_logs(self, buf: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        prefix = "train/" if self.cfg.objective == "sft" else "dpo/"
        out = {}
        for k, vs in buf.items():
            name = "train/loss" if k == "loss" else prefix + k
            out[name] = float(torch.cat(vs).mean().item())
        return out

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
        }
        path = ck.save_checkpoint(
            self.accelerator, self.output_dir, self.global_step, state, self.cfg.checkpoints_total_limit
        )
        self.accelerator.print(f"checkpoint written: {path}")
        return path

    # ---- pipelines, validation, export, evaluation --------------------------------------------------------------------
    def pipeline(self):
        """An inference pipeline around the current UNet (adapters live: disable them for the base)."""
        from diffusers import DiffusionPipeline

        c = self.comps
        kw = {
            "unet": _unwrap(self.accelerator, self.unet),
            "vae": c.vae,
            "text_encoder": c.text_encoders[0],
            "tokenizer": c.tokenizers[0],
        }
        if c.sdxl:
            kw.update(text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1])
        else:
            kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(c.model_path, **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _base_context(self, pipe):
        """Run ``pipe`` as the base model: adapters off (LoRA) or the frozen reference UNet (full)."""
        import contextlib

        from ..eval.compare import adapters_disabled

        if self.cfg.finetune == "lora":
            return adapters_disabled(pipe)

        @contextlib.contextmanager
        def swap():
            current = pipe.unet
            pipe.unet = self.reference.ref if self.reference is not None else current
            try:
                yield
            finally:
                pipe.unet = current

        return swap()

    @torch.no_grad()
    def validate(self) -> None:
        """Fixed prompts and seeds; base (top rows) beside current (bottom rows), saved as a PNG grid + logged."""
        cfg, acc = self.cfg, self.accelerator
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return
        from ..eval.compare import expand_prompts, generate
        from ..eval.report import image_grid

        self.unet.eval()
        pipe = self.pipeline()
        rows_p, rows_s = expand_prompts(cfg.validation_prompts, cfg.validation_seeds)
        with self._base_context(pipe):
            base = generate(
                pipe, rows_p, rows_s, steps=cfg.eval_steps, guidance=cfg.eval_guidance, desc="validation base"
            )
        cur = generate(
            pipe, rows_p, rows_s, steps=cfg.eval_steps, guidance=cfg.eval_guidance, desc="validation"
        )
        grid = image_grid(np.concatenate([base, cur]), ncols=len(rows_p), scale=4)
        out = self.output_dir / "validation"
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / f"step-{self.global_step:06d}.png")
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(
                    "validation/base_vs_current", np.asarray(grid), self.global_step, dataformats="HWC"
                )
        self.unet.train()
        acc.wait_for_everyone()

    def export(self, metrics: dict | None = None) -> Path:
        """LoRA -> ``<out>/lora`` (stock ``load_lora_weights``); full -> ``<out>/unet`` (``save_pretrained``)."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        unet = _unwrap(acc, self.unet)
        # Collective under FSDP / ZeRO-3 (every process takes part; the main process gets the full weights);
        # the module's own state_dict would hold only this process's shard there.
        state = acc.get_state_dict(self.unet)
        if cfg.finetune == "lora":
            target = self.output_dir / "lora"
            if acc.is_main_process:
                lora_lib.save_lora(target, unet, sdxl=self.comps.sdxl, state_dict=state)
        else:
            target = self.output_dir / "unet"
            if acc.is_main_process:
                unet.save_pretrained(target, safe_serialization=True, state_dict=state)
        if acc.is_main_process:
            from .model_card import write_model_card

            write_model_card(self.output_dir, cfg, self.data.describe(), metrics or {}, target)
        acc.wait_for_everyone()
        return target

    def evaluate(self) -> dict | None:
        """Base vs aligned on the evaluation split's prompts, same seeds; writes ``<out>/eval.json``."""
        cfg, acc = self.cfg, self.accelerator
        result = None
        if acc.is_main_process:
            from ..eval.protocol import evaluate_pipeline_pair

            pipe = self.pipeline()
            result = evaluate_pipeline_pair(
                pipe,
                base_context=self._base_context(pipe),
                dataset=cfg.dataset,
                split=cfg.eval_split,
                num_prompts=cfg.eval_num_prompts,
                seeds=cfg.eval_seeds,
                steps=cfg.eval_steps,
                guidance=cfg.eval_guidance,
                reward=cfg.eval_reward,
                batch_size=cfg.eval_batch_size,
                output_dir=self.output_dir,
            )
        acc.wait_for_everyone()
        return result

    def end(self) -> None:
        self.accelerator.end_training()


def _pair_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, 2, k]`` per-image values -> ``[2B, k]`` (winners then losers)."""
    if x is None:
        return None
    return torch.cat([x[:, 0], x[:, 1]], dim=0)

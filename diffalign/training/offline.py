"""The offline-pairs loop: Diffusion-DPO, its SFT baseline, and every objective of that shape.

The method comes from the objective registry (``cfg.objective`` -> :class:`~diffalign.objectives.registry.
ObjectiveSpec`); the step is :class:`~diffalign.training.step.PairStep`, composed from the parts the spec names.
This file owns only the loop: data order, accumulation, logging, non-finite losses, checkpoints and resume.
Set-up, validation, export and evaluation are shared with the online loop (:mod:`.run`, :mod:`.outputs`).

Randomness that decides the loss (timestep, noise, prompt dropout) is drawn per *pair* from a generator keyed by
(seed, epoch, dataset index): the same pair gets the same draws whatever the number of processes, the batch it lands
in, or an interruption and resume. That is what makes a 2-process run reproduce the 1-process loss curve and a resumed
run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..diffusion import noise as dn
from ..errors import ConfigError
from ..models import pipeline as mp
from ..objectives.registry import get_objective
from . import checkpoint as ck
from . import outputs, reference_cache
from .data import build_train_data, pair_groups
from .run import Run, append_log, backward_and_step, build_optimization, setup_run, start_outputs
from .step import PairStep


class OfflinePairsTrainer:
    """``setup()`` -> ``train()`` -> ``evaluate()`` -> ``export()``. The script calls them in order."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = get_objective(cfg.objective)
        if self.spec.loop != "offline_pairs":
            raise ConfigError(
                f"objective {cfg.objective!r} is an {self.spec.loop} method, not an offline-pairs one"
            )
        self.output_dir = Path(cfg.output_dir)
        self.skipped_nonfinite = 0

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.run = run = setup_run(cfg, self.spec)
        acc, comps = run.accelerator, run.comps
        self.accelerator, self.comps = acc, comps

        self.data = build_train_data(cfg, comps, acc)
        if self.data.num_pairs == 0 and not cfg.streaming:  # a stream's size is unknown until read
            raise ConfigError(
                f"dataset {cfg.dataset!r} split {cfg.split!r} has 0 usable pairs "
                f"({self.data.describe().get('filtering', 'no rows')}); choose another split or tie_policy"
            )
        noise_rows = None
        if getattr(cfg.params, "user_pair_groups", False):  # PPD: a pair's users batched and noised together
            if self.data.sampler is None:
                raise ConfigError(
                    "user_pair_groups needs a map-style dataset (not streaming): set streaming false"
                )
            groups, noise_rows = pair_groups(cfg, self.data.pairs)
            self.data.sampler.set_groups(groups)
            acc.print(f"user_pair_groups: {len(set(noise_rows.values())):,} image pairs over {len(groups):,} rows, "
                      "each pair's rows batched together with one (t, noise)")  # fmt: skip
        self.user_conditioning = None
        if (
            self.spec.conditioning == "user"
        ):  # PPD: user branch + projector join the UNet before the optimizer
            from .user_conditioning import UserConditioning

            self.user_conditioning = UserConditioning.build(cfg, run)
        self.effective_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        optimizer, lr_scheduler, self.lr, self.num_trainable = build_optimization(run, self.effective_batch)
        run.unet, self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            run.unet, optimizer, self.data.dataloader, lr_scheduler
        )
        self.step_fn = PairStep(
            spec=self.spec,
            params=cfg.params,
            comps=comps,
            unet=run.unet,
            reference=run.reference,
            alphas_cumprod=dn.scheduler_alphas_cumprod(comps.noise_scheduler).to(acc.device),
            weight_dtype=run.weight_dtype,
            empty_text=mp.encode_prompts(comps, [""]),  # prompt dropout target
            seed=cfg.seed,
            prompt_dropout=cfg.prompt_dropout,
            resolution=cfg.resolution,
            device=acc.device,
            autocast=acc.autocast,
            timestep_grid=getattr(cfg.params, "timestep_grid", None),
            channels_last=cfg.channels_last,
            **_inverse_schedule(comps.noise_scheduler),
        )
        self.step_fn.latent_store = self.data.latent_store
        self.step_fn.user_conditioning = self.user_conditioning
        self.step_fn.noise_rows = noise_rows
        self.model_samples = None
        if self.spec.loser_source == "model_samples":  # PSO: slot 1 is the current model's own sample
            from .model_samples import ModelSamples

            self.model_samples = ModelSamples(
                comps, cfg.params, seed=cfg.seed, resolution=cfg.resolution, weight_dtype=run.weight_dtype,
                device=acc.device, empty_text=self.step_fn.empty_text, autocast=acc.autocast,
            )  # fmt: skip
            acc.register_for_checkpointing(self.model_samples)  # before the resume below loads it
            self.step_fn.model_samples = self.model_samples
        self.step_fn.reference_errors = reference_cache.build_for_run(
            cfg, run, self.data, self.spec, self.step_fn
        )
        self.global_step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.seconds_before = 0.0  # training wall-clock of the run before this process (a resume)
        self._clock_start, self._paused = time.perf_counter(), 0.0
        resumed = self._resume()
        start_outputs(run, resumed, tracker_project=f"diffalign-{self.spec.name}")
        self._print_derived()

    def _resume(self) -> bool:
        """Load the checkpoint ``resume_from_checkpoint`` names (``latest`` falls back to older ones)."""
        st = ck.resume_state(
            self.accelerator, self.run.unet, self.output_dir, self.cfg.resume_from_checkpoint
        )
        if st is None:
            return False
        self.global_step, self.epoch, self.batches_in_epoch = (
            st["global_step"],
            st["epoch"],
            st["batches_in_epoch"],
        )
        self.seconds_before = float(st.get("train_seconds", 0.0))
        self.accelerator.print(
            f"resumed from {st['path']} at step {self.global_step} (epoch {self.epoch}, batch {self.batches_in_epoch})"
        )
        ck.warn_changed_settings(self.accelerator, st, self._settings())
        return True

    def _settings(self) -> dict:
        return ck.run_settings(self.cfg, ck.OFFLINE_POSITION_FIELDS, self.accelerator.num_processes)

    def _print_derived(self) -> None:
        cfg, acc, spec = self.cfg, self.accelerator, self.spec
        n = self.data.num_pairs
        steps_per_epoch = math.ceil(n / self.effective_batch) if n else float("nan")
        params = ", ".join(f"{k} {v}" for k, v in vars(cfg.params).items()) or "no hyperparameters"
        acc.print(
            "\n".join(
                [
                    "---- diffalign: offline preference training ----",
                    f"model            {self.comps.model_path} ({'SDXL' if self.comps.sdxl else 'SD1.x'}, {self.comps.prediction_type})",
                    f"objective        {spec.name}: {spec.description} ({params})",
                    f"step             timesteps {spec.timesteps}, noising {spec.noising}, errors in {spec.error_space} "
                    f"space, reference {'yes' if spec.needs_reference else 'no'}, "
                    f"{self._slots()}",
                    f"fine-tuning      {cfg.finetune}: {self.num_trainable:,} trainable parameters; attention {self.run.attention}",
                    f"reference cache  {self._reference_cache_line()}",
                    f"data             {n:,} usable pairs ({self._data_mode()})",
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

    def _slots(self) -> str:
        if not self.spec.uses_losers:
            return "winners only"
        if self.model_samples is not None:
            p = self.cfg.params
            return (f"winners against the model's own samples ({p.model_sample_sampler}, {p.model_sample_steps} "
                    f"steps, guidance {p.model_sample_guidance})")  # fmt: skip
        return "winner and loser"

    def _data_mode(self) -> str:
        if self.data.latent_store is not None:
            return f"latent cache filled as training goes: {len(self.data.latent_store):,} pairs stored"
        return "cached latents" if self.data.cached else "encoded on the fly"

    def _reference_cache_line(self) -> str:
        stored = self.step_fn.reference_errors
        if stored is None:
            if not self.spec.needs_reference:
                return "not needed (no reference)"
            if not self.cfg.reference_cache:
                return "off (reference_cache false)"
            return (
                "not applicable (the noised input or the slot-1 images depend on the trained model, or the data is "
                "streamed)"
            )
        return f"{stored.stored_entries:,} stored reference errors in {stored.directory} (filled as training goes)"

    # ---- one step (kept as a method: tests and benchmarks call it) ---------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair loss ``[B]`` and metrics for one micro-batch."""
        if self.model_samples is not None:
            self.model_samples.step = self.global_step
        return self.step_fn(batch, int(batch.get("epoch", self.epoch)))

    # ---- loop ------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        unet = self.run.unet
        progress = tqdm(
            total=cfg.max_train_steps,
            initial=self.global_step,
            desc="train",
            disable=not acc.is_local_main_process,
        )
        history: list[dict] = []
        log_buf: dict[str, list[torch.Tensor]] = {}
        t0 = time.time()
        self._clock_start, self._paused = time.perf_counter(), 0.0
        t_log, steps_since_log = None, 0  # throughput window (starts after the first step: warm-up excluded)
        unet.train()
        if self.global_step == 0 and cfg.validation_steps > 0:
            with self._clock_paused():
                outputs.validate(self.run, 0)
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
                with acc.accumulate(unet):
                    loss, metrics = self.compute_loss(batch)
                    where = f"step {self.global_step + 1} (epoch {self.epoch}, batch {self.batches_in_epoch})"
                    finite = backward_and_step(self.run, loss, self.optimizer, self.lr_scheduler, where)
                    if not finite:
                        self.skipped_nonfinite += 1
                        acc.print(
                            f"non-finite loss at step {self.global_step + 1}: update skipped ({self.skipped_nonfinite} so far)"
                        )
                self.batches_in_epoch += 1
                if finite:  # metrics are gathered across processes before they become Python numbers
                    for k, v in {"loss": loss, **metrics}.items():
                        log_buf.setdefault(k, []).append(acc.gather(v.detach().float().reshape(-1)))
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                progress.update(1)
                steps_since_log += 1
                if t_log is None:
                    t_log, steps_since_log = time.perf_counter(), 0
                if (
                    self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_train_steps
                ) and log_buf:
                    logs = self._reduce_logs(log_buf)
                    logs["train/lr"] = self.lr_scheduler.get_last_lr()[0]
                    logs["train/step"] = self.global_step
                    if self.skipped_nonfinite:
                        logs["train/skipped_nonfinite"] = self.skipped_nonfinite
                    if steps_since_log:
                        elapsed = time.perf_counter() - t_log
                        logs["perf/pairs_per_s"] = steps_since_log * self.effective_batch / elapsed
                        logs["perf/seconds_per_step"] = elapsed / steps_since_log
                        t_log, steps_since_log = time.perf_counter(), 0
                    history.append(logs)
                    append_log(self.run, logs)
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    if cfg.report_to != "none":
                        acc.log(logs, step=self.global_step)
                    log_buf = {}
                if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.validation_steps and self.global_step % cfg.validation_steps == 0:
                    with self._clock_paused():
                        outputs.validate(self.run, self.global_step)
                if self.global_step in cfg.eval_curve_steps and self.global_step < cfg.max_train_steps:
                    with self._clock_paused():
                        unet.eval()
                        outputs.evaluate(self.run, curve_point=(self.global_step, self.train_seconds()))
                        unet.train()
                if self.global_step >= cfg.max_train_steps:
                    break
            else:  # the epoch ran out
                self.epoch += 1
                self.batches_in_epoch = 0
        progress.close()
        if not cfg.checkpointing_steps or self.global_step % cfg.checkpointing_steps:
            self.save_checkpoint()
        self.data.report(acc)
        for store in self._stores():
            acc.print(store.describe())
        if self.model_samples is not None:
            acc.print(self.model_samples.describe())
        if self.skipped_nonfinite:
            acc.print(f"{self.skipped_nonfinite} micro-batches had a non-finite loss and were skipped")
        return {"steps": self.global_step, "train_seconds": time.time() - t0, "history": history,
                "skipped_nonfinite": self.skipped_nonfinite}  # fmt: skip

    def _reduce_logs(self, buf: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        prefix = self.spec.metric_prefix + "/"
        return {
            ("train/loss" if k == "loss" else prefix + k): float(torch.cat(vs).mean().item())
            for k, vs in buf.items()
        }

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "train_seconds": self.train_seconds(),
            "settings": self._settings(),
        }
        path = ck.save_checkpoint(
            self.accelerator, self.output_dir, self.global_step, state, self.cfg.checkpoints_total_limit
        )
        self.flush_caches()
        self.accelerator.print(f"checkpoint written: {path}")
        return path

    def _stores(self) -> list:
        """The lazy latent store and the reference-error cache, where the run has them (tests may swap the step)."""
        found = (getattr(self.step_fn, n, None) for n in ("latent_store", "reference_errors"))
        return [s for s in found if s is not None]

    def flush_caches(self) -> None:
        """Write the latents and reference errors recorded since the last flush (what a later run reuses)."""
        for store in self._stores():
            store.flush()

    # ---- outputs (shared with the online loop) ------------------------------------------------------------------------
    def validate(self) -> Path | None:
        return outputs.validate(self.run, self.global_step)

    def export(self, metrics: dict | None = None, *, weights: bool = True) -> Path:
        target = outputs.export(self.run, metrics or {}, self.data.describe(), weights=weights)
        if weights and self.user_conditioning is not None and self.accelerator.is_main_process:
            self.user_conditioning.export(self.output_dir, outputs.check_finite)
        return target

    def evaluate(self) -> dict | None:
        if self.user_conditioning is not None:  # per-user evaluation on unseen users (eval.json + per_user)
            return outputs.evaluate_personal(self.run, self.user_conditioning)
        point = (self.global_step, self.train_seconds()) if self.cfg.eval_curve_steps else None
        return outputs.evaluate(self.run, curve_point=point)

    def train_seconds(self) -> float:
        """Training wall-clock of the whole run so far (resumed runs included); validation and curve evaluations,
        which a run without them would not spend, are left out."""
        return self.seconds_before + time.perf_counter() - self._clock_start - self._paused

    @contextlib.contextmanager
    def _clock_paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def pipeline(self):
        return outputs.inference_pipeline(self.run)

    @property
    def unet(self):
        return self.run.unet

    def end(self) -> None:
        self.accelerator.end_training()


def _inverse_schedule(scheduler) -> dict:
    """The inverse-grid offset and initial ᾱ that diffusers' DDIMInverseScheduler derives from this schedule."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    return {
        "steps_offset": int(inverse.config.steps_offset),
        "initial_alpha_cumprod": float(inverse.initial_alpha_cumprod),
    }


__all__ = ["OfflinePairsTrainer", "Run"]

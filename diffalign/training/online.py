"""The online loop: each epoch samples images with the frozen current model (θ_old), scores them with a reward, and
updates on the stored trajectories — PRDP, DDPO and every objective with ``loop="online"``.

    epoch e:  prompts_e = PromptStream.epoch_prompts(e, P)        (this process: its P / n_processes share)
              sample N images per prompt with θ_old, recording x_T … x_0 and log p_old per step   diffusion/sampling.py
              score the final images with the training reward (a learned reward, not the judge)
              advantages = spec.prepare_rewards(gathered rewards, prompts, params, state)   (if the spec has one)
              K passes: micro-batches of whole prompt groups; a share of each trajectory's steps (the same step
                        positions for all images of one prompt); log p under θ (with gradient), log p under the
                        reference (no grad, if the spec needs it) -> spec.loss(TrajectoryLogProbs) -> update
              θ_old := θ (the next epoch samples with the updated weights)

The set-up, reference, optimizer, LoRA hooks, checkpoints, validation grids, export and final evaluation are the
offline loop's (:mod:`.run`, :mod:`.checkpoint`, :mod:`.outputs`); this file owns the epoch.

Randomness is keyed, never carried: the prompts of epoch e are a function of (seed, e); each trajectory's noise of
(seed, e, its global row); the pass order and trained steps of (seed, e, pass, prompt). So a run killed after a
checkpoint resumes to the same weights, and the samples do not depend on the number of processes.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import noise as dn
from ..diffusion import sampling as ds
from ..diffusion.parts import pair_seed
from ..errors import ConfigError
from ..eval.prompt_stream import GRAMMAR_SOURCE, PromptStream, eval_prompt_set
from ..models import conditioning as mc
from ..models import pipeline as mp
from ..objectives.inputs import TrajectoryLogProbs
from ..objectives.registry import get_objective
from ..preflight import vae_downsampling
from . import checkpoint as ck
from . import outputs
from .run import append_log, backward_and_step, build_optimization, setup_run, start_outputs


@dataclass
class EpochSamples:
    """One process's samples of one epoch (``M = prompts x images`` rows, grouped by prompt)."""

    prompts: list[str]  # [M]
    groups: torch.Tensor  # [M] global prompt index within the epoch
    latents: torch.Tensor  # [M, S+1, C, h, w] float32 (CPU)
    log_probs: torch.Tensor  # [M, S] under θ_old
    rewards: torch.Tensor  # [M] float32
    text: dict[str, torch.Tensor]  # text embeddings per row
    images: np.ndarray  # [M, H, W, 3] uint8


def reward_function(spec: str, device):
    """``fn(images uint8 [N, H, W, 3], prompts) -> float32 Tensor [N]`` for a catalog reward name or a weighted sum
    ``'name:weight,name:weight'`` (raw scores, no normalisation: the reward of a sample must not depend on the
    others, or a resumed run would differ)."""
    from ..rewards.catalog import load_reward
    from ..rewards.combine import CombinedReward

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("config field reward is empty: give a catalog name such as sandbox-vp-score")
    if len(parts) == 1 and ":" not in parts[0]:
        if parts[0] == "sandbox-judge":
            from ..sandbox.judge import Judge

            judge = Judge()
            return lambda images, prompts: torch.as_tensor(judge.score(images, prompts)["overall"]).float()
        reward = load_reward(parts[0], device=device)
        return lambda images, prompts: reward.score(images, prompts).detach().float().cpu()
    components = []
    for p in parts:
        name, _, weight = p.partition(":")
        try:
            components.append({"reward": name.strip(), "weight": float(weight or 1.0)})
        except ValueError as err:
            raise ConfigError(f"config field reward: weight {weight!r} of {name!r} is not a number") from err
    combined = CombinedReward.from_config({"normalize": "none", "components": components}, device=device)
    return lambda images, prompts: combined.score(images, prompts).detach().float().cpu()


class OnlineTrainer:
    """``setup()`` -> ``train()`` -> ``evaluate()`` -> ``export()``, like the offline trainer."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = get_objective(cfg.objective)
        if self.spec.loop != "online":
            raise ConfigError(f"objective {cfg.objective!r} is an {self.spec.loop} method, not an online one")
        self.output_dir = Path(cfg.output_dir)
        self.epoch, self.global_step, self.skipped_nonfinite = 0, 0, 0
        self.reward_state: dict = {}

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        # prompts first: a bad prompt source is reported before any model loads
        self.eval_prompts = None
        if cfg.eval_prompts:
            self.eval_prompts = eval_prompt_set(
                cfg.eval_prompts, cfg.eval_num_prompts, seed=0, split=cfg.eval_split
            )
        self.stream = PromptStream(
            cfg.prompts, seed=cfg.seed, pool_size=cfg.prompt_pool_size, exclude=self.eval_prompts or (),
            split=cfg.prompt_split,
        )  # fmt: skip
        self.run = run = setup_run(cfg, self.spec)
        acc, comps = run.accelerator, run.comps
        self.accelerator, self.comps = acc, comps
        n = acc.num_processes
        if cfg.prompts_per_epoch % n:
            raise ConfigError(
                f"config field prompts_per_epoch={cfg.prompts_per_epoch} must be divisible by the {n} processes"
            )
        self.local_prompts = cfg.prompts_per_epoch // n
        if self.local_prompts % cfg.train_batch_size:
            raise ConfigError(
                f"config field train_batch_size={cfg.train_batch_size} (prompts per micro-batch) must divide the "
                f"{self.local_prompts} prompts each process samples per epoch"
            )
        self.micro_batches = self.local_prompts // cfg.train_batch_size * cfg.updates_per_epoch
        if self.micro_batches % cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"config field gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide the "
                f"{self.micro_batches} micro-batches of an epoch"
            )
        self.steps_per_epoch = self.micro_batches // cfg.gradient_accumulation_steps
        cfg.max_train_steps = cfg.num_epochs * self.steps_per_epoch  # what the learning-rate schedule spans
        optimizer, lr_scheduler, self.lr, self.num_trainable = build_optimization(run, cfg.train_batch_size)
        run.unet, self.optimizer, self.lr_scheduler = acc.prepare(run.unet, optimizer, lr_scheduler)

        self.alphas_cumprod = dn.scheduler_alphas_cumprod(comps.noise_scheduler).to(acc.device)
        self.schedule = ds.sampling_schedule(comps.noise_scheduler, cfg.sample_steps, cfg.sampler)
        # DDPM and Euler-ancestral are DDIM with η 1; LCM's per-step η is in the schedule
        self.eta = 1.0 if cfg.sampler in ("ddpm", "euler_ancestral", "lcm") else cfg.sample_eta
        self.trainable_steps = torch.nonzero(self.schedule.trainable(self.alphas_cumprod.cpu())).flatten()
        self.steps_trained = max(1, round(cfg.timestep_fraction * len(self.trainable_steps)))
        self.empty_text = self._unconditional_text()
        self.reward_fn = reward_function(cfg.reward, acc.device)
        st = ck.resume_state(acc, run.unet, self.output_dir, cfg.resume_from_checkpoint)
        if st is not None:
            self.epoch, self.global_step = st["epoch"], st["global_step"]
            self.reward_state = st.get("reward_state", {})
            self.skipped_nonfinite = st.get("skipped_nonfinite", 0)
            acc.print(f"resumed from {st['path']} at epoch {self.epoch} (step {self.global_step})")
            ck.warn_changed_settings(acc, st, self._settings())
        start_outputs(run, st is not None, tracker_project=f"diffalign-{self.spec.name}")
        self._print_derived()

    def _print_derived(self) -> None:
        cfg, acc, spec = self.cfg, self.accelerator, self.spec
        params = ", ".join(f"{k} {v}" for k, v in vars(cfg.params).items()) or "no hyperparameters"
        samples = cfg.num_epochs * cfg.prompts_per_epoch * cfg.images_per_prompt
        acc.print(
            "\n".join(
                [
                    "---- diffalign: online preference training ----",
                    f"model            {self.comps.model_path} ({'SDXL' if self.comps.sdxl else 'SD1.x'}, {self.comps.prediction_type})",
                    f"objective        {spec.name}: {spec.description} ({params})",
                    f"reward           {cfg.reward} (training); evaluation by {cfg.eval_reward}",
                    f"prompts          {self.stream.describe()}",
                    f"epoch            {cfg.prompts_per_epoch} prompts x {cfg.images_per_prompt} images, sampled in "
                    f"{cfg.sample_steps} steps (eta {cfg.sample_eta}, guidance {cfg.sample_guidance}); "
                    f"{cfg.updates_per_epoch} pass(es), {self.steps_trained} of {len(self.trainable_steps)} steps "
                    f"per trajectory; {self.steps_per_epoch} optimizer steps",
                    f"run              {cfg.num_epochs} epochs = {samples:,} samples, {cfg.max_train_steps} optimizer steps",
                    f"fine-tuning      {cfg.finetune}: {self.num_trainable:,} trainable parameters; attention {self.run.attention}",
                    f"learning rate    {self.lr:.3g}, {cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}",
                    f"processes        {acc.num_processes} ({self.local_prompts} prompts each per epoch); device {acc.device}",
                    f"output           {self.output_dir}",
                ]
            )
        )

    # ---- conditioning ------------------------------------------------------------------------------------------
    def _unconditional_text(self) -> dict[str, torch.Tensor]:
        """The unguided branch's text input, as the model's own diffusers pipeline builds it: SD1.x encodes "";
        SDXL pipelines with ``force_zeros_for_empty_prompt`` (the default) use all-zero embeddings instead, and the
        samples of training must come from the distribution validation, evaluation and users sample from."""
        empty = mp.encode_prompts(self.comps, [""])
        if self.comps.sdxl:
            index = Path(self.comps.model_path) / "model_index.json"
            force = (
                json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
                if index.is_file()
                else True
            )
            if force:
                empty = {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def _unet_kwargs(self, text: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
        """Conditional and unconditional UNet keyword inputs for these rows."""
        n = next(iter(text.values())).shape[0]
        dtype = self.run.weight_dtype
        cond = mc.text_conditioning(self.comps, text, self.cfg.resolution).unet_kwargs(dtype)
        if self.cfg.sample_guidance <= 1.0:  # no classifier-free guidance, as in diffusers' pipelines
            return cond, None
        empty = {k: v.expand(n, *v.shape[1:]) for k, v in self.empty_text.items()}
        uncond = mc.text_conditioning(self.comps, empty, self.cfg.resolution).unet_kwargs(dtype)
        return cond, uncond

    def _model_fn(self, unet, text):
        cond, uncond = self._unet_kwargs(text)
        return ds.guided_model(unet, cond, uncond, self.cfg.sample_guidance, self.run.weight_dtype)

    # ---- sampling and scoring --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, dict[str, float]]:
        """Sample this process's prompts of ``epoch`` with the current weights (θ_old) and score them."""
        cfg, acc = self.cfg, self.accelerator
        rank, n_img = acc.process_index, cfg.images_per_prompt
        all_prompts = self.stream.epoch_prompts(epoch, cfg.prompts_per_epoch)
        first = rank * self.local_prompts
        mine = all_prompts[first : first + self.local_prompts]
        rows_p = [p for p in mine for _ in range(n_img)]
        groups = torch.tensor([first + i for i in range(len(mine)) for _ in range(n_img)])
        global_rows = [(first + i) * n_img + j for i in range(len(mine)) for j in range(n_img)]
        seeds = [pair_seed(cfg.seed, epoch, r) for r in global_rows]
        text_p = mp.encode_prompts(self.comps, mine)
        text = {k: v.repeat_interleave(n_img, dim=0) for k, v in text_p.items()}
        h = cfg.resolution // vae_downsampling(self.comps.vae.config)
        shape = (self.run.unwrapped_unet().config.in_channels, h, h)
        unet = self.run.unwrapped_unet()
        was_training = unet.training
        unet.eval()
        t_sample = t_score = 0.0
        latents, logps, rewards, images = [], [], [], []
        pool = ThreadPoolExecutor(max_workers=1)  # scoring of chunk i overlaps sampling of chunk i + 1
        pending = None
        bs = cfg.sample_batch_size
        for i in range(0, len(rows_p), bs):
            t0 = time.perf_counter()
            sl = slice(i, i + bs)
            noise = ds.row_noise(seeds[sl], len(self.schedule), shape)
            traj = ds.sample_trajectories(
                self._model_fn(unet, {k: v[sl] for k, v in text.items()}), noise, self.schedule,
                self.alphas_cumprod, eta=self.eta, prediction_type=self.comps.prediction_type,
                init_noise_sigma=float(getattr(self.comps.noise_scheduler, "init_noise_sigma", 1.0)),
            )  # fmt: skip
            img = self._decode(traj.final)
            latents.append(traj.latents.cpu())
            logps.append(traj.log_probs.cpu())
            images.append(img)
            t_sample += time.perf_counter() - t0
            if pending is not None:
                t0 = time.perf_counter()
                rewards.append(pending.result())
                t_score += time.perf_counter() - t0
            pending = pool.submit(self.reward_fn, img, rows_p[sl])
        t0 = time.perf_counter()
        rewards.append(pending.result())
        t_score += time.perf_counter() - t0
        pool.shutdown()
        unet.train(was_training)
        rewards = torch.cat(rewards).float()
        # the null control: each prompt's rewards shuffled among its images
        if cfg.reward_control == "permute":
            from ..rewards.control import permute_within_groups

            ids = torch.unique(groups).tolist()
            rewards = permute_within_groups(
                rewards, groups, [pair_seed(cfg.seed, epoch, 2_000_003 + g) for g in ids]
            )
        samples = EpochSamples(
            prompts=rows_p, groups=groups, latents=torch.cat(latents), log_probs=torch.cat(logps),
            rewards=rewards, text={k: v.cpu() for k, v in text.items()},
            images=np.concatenate(images),
        )  # fmt: skip
        return samples, {"sample": t_sample, "score_wait": t_score}

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.comps.vae
        x = vae.decode((latents / self.comps.vae_scaling_factor).to(vae.dtype)).sample.float()
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ---- updates -------------------------------------------------------------------------------------------------
    def _advantages(self, samples: EpochSamples) -> torch.Tensor | None:
        """The spec's ``prepare_rewards`` over every process's rewards of this epoch (each process keeps its rows)."""
        if self.spec.prepare_rewards is None:
            return None
        acc = self.accelerator
        rewards = acc.gather(samples.rewards.to(acc.device)).cpu()
        groups = acc.gather(samples.groups.to(acc.device)).cpu()
        epoch_prompts = self.stream.epoch_prompts(self.epoch, self.cfg.prompts_per_epoch)
        prompts = [epoch_prompts[int(g)] for g in groups]
        adv = torch.as_tensor(self.spec.prepare_rewards(rewards, prompts, self.cfg.params, self.reward_state))
        first = acc.process_index * len(samples.rewards)
        return adv[first : first + len(samples.rewards)].float()

    def _step_choice(self, epoch: int, k: int, group: int) -> torch.Tensor:
        """The trained step positions of one prompt's trajectories in pass ``k`` (sorted)."""
        g = torch.Generator().manual_seed(pair_seed(self.cfg.seed, epoch * 1009 + k, 1_000_003 + group))
        perm = torch.randperm(len(self.trainable_steps), generator=g)[: self.steps_trained]
        return self.trainable_steps[perm.sort().values]

    def micro_batch(
        self, samples: EpochSamples, groups: torch.Tensor, epoch: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of prompt ``groups`` and their trained step positions ``[rows, s]`` in pass ``k`` (the same
        positions for all images of one prompt)."""
        n_img = self.cfg.images_per_prompt
        rows = (groups.unsqueeze(1) * n_img + torch.arange(n_img)).flatten()
        steps = torch.stack(
            [self._step_choice(epoch, k, int(samples.groups[g * n_img])) for g in groups.tolist()]
        ).repeat_interleave(n_img, dim=0)
        return rows, steps

    def trajectory_inputs(
        self,
        samples: EpochSamples,
        rows: torch.Tensor,
        steps: torch.Tensor,
        advantages: torch.Tensor | None = None,
    ) -> TrajectoryLogProbs:
        """What the objective sees for ``rows`` of an epoch's samples at ``steps [rows, s]``: log-probs of the stored
        transitions under the current model (with gradient when enabled) and the reference (no grad, if the spec
        needs one), the recorded θ_old log-probs, rewards, prompt groups and advantages."""
        acc = self.accelerator
        text = {n: v[rows].to(acc.device) for n, v in samples.text.items()}
        lat = samples.latents[rows]
        kw = dict(eta=self.eta, prediction_type=self.comps.prediction_type)
        with acc.autocast():
            logp = ds.transition_log_probs(
                self._model_fn(self.run.unet, text), lat, self.schedule, steps, self.alphas_cumprod, **kw
            )
        logp_ref = None
        if self.spec.needs_reference:
            with self.run.reference() as ref, acc.autocast():
                logp_ref = ds.transition_log_probs(
                    self._model_fn(ref, text), lat, self.schedule, steps, self.alphas_cumprod, **kw
                ).detach()
        return TrajectoryLogProbs(
            log_prob=logp,
            log_prob_old=samples.log_probs[rows].gather(1, steps).to(acc.device),
            rewards=samples.rewards[rows].to(acc.device),
            groups=samples.groups[rows].to(acc.device),
            log_prob_ref=logp_ref,
            advantages=None if advantages is None else advantages[rows].to(acc.device),
        )

    def train_epoch(self, samples: EpochSamples) -> list[dict[str, torch.Tensor]]:
        cfg, acc, spec = self.cfg, self.accelerator, self.spec
        unet, n_img = self.run.unet, cfg.images_per_prompt
        advantages = self._advantages(samples)
        n_groups = len(samples.prompts) // n_img
        metrics_out: list[dict[str, torch.Tensor]] = []
        for k in range(cfg.updates_per_epoch):
            order = torch.randperm(
                n_groups, generator=torch.Generator().manual_seed(pair_seed(cfg.seed, self.epoch, 7 + k))
            )
            for b in range(0, n_groups, cfg.train_batch_size):
                rows, steps = self.micro_batch(samples, order[b : b + cfg.train_batch_size], self.epoch, k)
                with acc.accumulate(unet):
                    inputs = self.trajectory_inputs(samples, rows, steps, advantages)
                    loss, metrics = spec.loss(inputs, cfg.params)
                    where = f"epoch {self.epoch}, pass {k}, micro-batch {b // cfg.train_batch_size}"
                    if not backward_and_step(self.run, loss, self.optimizer, self.lr_scheduler, where):
                        self.skipped_nonfinite += 1
                        acc.print(
                            f"non-finite loss at {where}: update skipped ({self.skipped_nonfinite} so far)"
                        )
                        continue
                if acc.sync_gradients:
                    self.global_step += 1
                metrics_out.append({"loss": loss.detach().float().reshape(-1), **metrics})
        return metrics_out

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        history: list[dict] = []
        t_start = time.time()
        self.run.unet.train()
        if self.epoch == 0 and cfg.validation_steps > 0:
            outputs.validate(self.run, 0)
        if self.epoch == 0 and cfg.track_every:
            append_log(self.run, {"epoch": 0, **self.track_heldout()})
        progress = tqdm(
            total=cfg.num_epochs, initial=self.epoch, desc="epochs", disable=not acc.is_local_main_process
        )
        while self.epoch < cfg.num_epochs:
            t0 = time.perf_counter()
            samples, times = self.sample_epoch(self.epoch)
            t1 = time.perf_counter()
            metrics = self.train_epoch(samples)
            times["train"] = time.perf_counter() - t1
            times["epoch"] = time.perf_counter() - t0
            self.epoch += 1
            logs = self._epoch_logs(samples, metrics, times)
            if cfg.track_every and self.epoch % cfg.track_every == 0:
                logs.update(self.track_heldout())
            history.append(logs)
            append_log(self.run, logs)
            if cfg.report_to != "none":
                acc.log(logs, step=self.epoch)
            progress.update(1)
            progress.set_postfix(
                reward=f"{logs['train/reward_mean']:.3f}",
                s=f"{times['sample']:.0f}+{times['score_wait']:.0f}+{times['train']:.0f}s",
            )
            if cfg.checkpointing_steps and self.epoch % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
            if cfg.validation_steps and self.epoch % cfg.validation_steps == 0:
                outputs.validate(self.run, self.epoch)
        progress.close()
        if not cfg.checkpointing_steps or self.epoch % cfg.checkpointing_steps:
            self.save_checkpoint()
        return {"epochs": self.epoch, "steps": self.global_step, "train_seconds": time.time() - t_start,
                "history": history, "skipped_nonfinite": self.skipped_nonfinite}  # fmt: skip

    def _epoch_logs(self, samples: EpochSamples, metrics: list[dict], times: dict) -> dict:
        acc, prefix = self.accelerator, self.spec.metric_prefix + "/"
        rewards = acc.gather(samples.rewards.to(acc.device)).float()
        logs: dict[str, float] = {
            "epoch": self.epoch,
            "train/step": self.global_step,
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "train/lr": self.lr_scheduler.get_last_lr()[0],
            "perf/samples_per_s": len(rewards) / times["epoch"],
        }
        for k, v in times.items():
            logs[f"perf/{k}_seconds"] = v
        keys = sorted({k for m in metrics for k in m})
        for k in keys:
            vals = [m[k].detach().float().reshape(-1) for m in metrics if k in m]
            local = torch.cat(vals).to(acc.device) if vals else torch.zeros(0, device=acc.device)
            # gather needs equal sizes: reduce to (sum, count) per process first
            sc = acc.gather(
                torch.stack([local.sum(), torch.tensor(float(local.numel()), device=acc.device)]).reshape(
                    1, 2
                )
            )
            total, count = sc.sum(0).tolist()
            logs["train/loss" if k == "loss" else prefix + k] = total / count if count else float("nan")
        if self.skipped_nonfinite:
            logs["train/skipped_nonfinite"] = self.skipped_nonfinite
        return logs

    @torch.no_grad()
    def track_heldout(self) -> dict[str, float]:
        """Mean ``eval_reward`` aspects of the current model on the first ``track_prompts`` held-out prompts (fixed
        seeds, the evaluation sampler): the held-out curve of the run (``heldout/<aspect>``)."""
        cfg, acc = self.cfg, self.accelerator
        if not acc.is_main_process:
            return {}
        from ..eval.compare import generate
        from ..eval.protocol import reward_score_fn, split_prompts

        if "track" not in self.run.extra:
            prompts = self.eval_prompts or split_prompts(cfg.dataset, cfg.eval_split)
            self.run.extra["track"] = (prompts[: cfg.track_prompts], reward_score_fn(cfg.eval_reward))
        prompts, score = self.run.extra["track"]
        unet = self.run.unwrapped_unet()
        was_training = unet.training
        unet.eval()
        images = generate(
            outputs.inference_pipeline(self.run), prompts, [cfg.eval_seeds[0]] * len(prompts),
            steps=cfg.eval_steps, guidance=cfg.eval_guidance, batch_size=cfg.eval_batch_size, desc="held-out",
        )  # fmt: skip
        unet.train(was_training)
        scores = {k: np.asarray(v, dtype=float) for k, v in score(images, prompts).items()}
        # per-attribute aspects are undefined (NaN) for prompts that do not name the attribute
        return {f"heldout/{k}": float(np.nanmean(v)) for k, v in scores.items() if np.isfinite(v).any()}

    def _settings(self) -> dict:
        return ck.run_settings(self.cfg, ck.ONLINE_POSITION_FIELDS, self.accelerator.num_processes)

    def save_checkpoint(self) -> Path:
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "reward_state": json.loads(json.dumps(self.reward_state)),
            "skipped_nonfinite": self.skipped_nonfinite,
            "settings": self._settings(),
        }
        path = ck.save_checkpoint(
            self.accelerator, self.output_dir, self.epoch, state, self.cfg.checkpoints_total_limit
        )
        self.accelerator.print(f"checkpoint written: {path}")
        return path

    # ---- outputs (shared with the offline loop) -----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        source = None
        if self.eval_prompts is not None:
            split = f" {self.cfg.eval_split}" if self.cfg.eval_prompts == GRAMMAR_SOURCE else ""
            source = (
                f"{self.cfg.eval_prompts}{split} (held out from training, {len(self.eval_prompts)} prompts)"
            )
        return outputs.evaluate(self.run, prompts=self.eval_prompts, prompt_source=source)

    def export(self, metrics: dict | None = None, *, weights: bool = True) -> Path:
        cfg = self.cfg
        data = {
            "prompts": self.stream.describe(),
            "samples": cfg.num_epochs * cfg.prompts_per_epoch * cfg.images_per_prompt,
            "reward": cfg.reward,
        }
        return outputs.export(self.run, metrics or {}, data, weights=weights)

    def pipeline(self):
        return outputs.inference_pipeline(self.run)

    def end(self) -> None:
        self.accelerator.end_training()


__all__ = ["OnlineTrainer", "EpochSamples", "reward_function"]

"""Slot 1 from the current model: each pair's second image is a sample the model being trained draws for the pair's
caption (PSO's reference images; the spec says ``loser_source="model_samples"``).

A pair's sample is drawn the first time the pair is used in a *round* and reused until the round ends: rounds are
``model_sample_refresh`` optimizer steps long (0: one round, so each pair's sample is drawn once, at first use, by the
model of that step — the official customisation script draws its samples once, at step 0, from the model it starts
from). Samples come from the objective's few-step sampler (``model_sample_sampler`` at ``model_sample_steps``, e.g.
Euler-ancestral at 4 steps, no guidance for a distilled model) as latents, without a VAE round trip (the official
script decodes them to images and encodes them again). The noise of pair ``i`` in round ``r`` comes from its own
generator, keyed by (seed, round, i), so a sample does not depend on the batch it was drawn in.

The store is part of every checkpoint (``accelerator.register_for_checkpointing``; with several processes each one's
entries are gathered into the saved state), so a resumed run reads the samples the interrupted one drew and draws the
rest at the same steps with the same model: resume stays exact.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..diffusion import noise as dn
from ..diffusion import sampling as ds
from ..diffusion.parts import pair_seed
from ..models import conditioning as mc

SAMPLE_STREAM = 0x50534F  # keeps these draws apart from the pair's (t, ε) stream


class ModelSamples:
    """Per-pair samples of the current model, ``latents(...) -> [B, C, h, w]``, refreshed every ``refresh`` steps."""

    def __init__(self, comps, params, *, seed: int, resolution: int, weight_dtype: torch.dtype, device,
                 empty_text: dict[str, torch.Tensor], autocast=None):  # fmt: skip
        self.comps, self.seed, self.resolution = comps, int(seed), resolution
        self.weight_dtype, self.device = weight_dtype, device
        self.refresh = int(params.model_sample_refresh)
        self.guidance = float(params.model_sample_guidance)
        self.empty_text = empty_text
        self.autocast = autocast
        self.alphas_cumprod = dn.scheduler_alphas_cumprod(comps.noise_scheduler).to(device)
        self.schedule = ds.sampling_schedule(
            comps.noise_scheduler, params.model_sample_steps, params.model_sample_sampler
        )
        self.step = 0  # the trainer's global step, set before every micro-batch
        self.store: dict[int, tuple[int, torch.Tensor]] = {}  # pair index -> (round, latent [C, h, w] on CPU)
        self.drawn = 0  # samples drawn by this process (for the run's summary)

    def fresh(self, seed: int) -> ModelSamples:
        """An empty store with the same settings and another seed (for pairs of another split, whose indices would
        collide with the training pairs')."""
        out = copy.copy(self)
        out.seed, out.store, out.drawn = int(seed), {}, 0
        return out

    def current_round(self) -> int:
        return self.step // self.refresh if self.refresh else 0

    @torch.no_grad()
    def latents(self, unet: torch.nn.Module, indices: torch.Tensor, text: dict[str, torch.Tensor],
                shape: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
        """The samples of pairs ``indices`` (``[B]``, source rows) for their captions ``text`` (``{name: [B, ...]}``),
        drawn now where the store has none of this round; ``shape`` is a latent's ``(C, h, w)``. float32, on the
        device."""
        r = self.current_round()
        idx = [int(i) for i in indices.tolist()]
        need = [b for b, i in enumerate(idx) if i not in self.store or self.store[i][0] != r]
        if need:
            rows = torch.tensor(need)
            sub = {n: v[rows.to(v.device)] for n, v in text.items()}
            seeds = [pair_seed(self.seed, r, idx[b]) ^ SAMPLE_STREAM for b in need]
            drawn = self._sample(unet, sub, seeds, shape)
            for j, b in enumerate(need):
                self.store[idx[b]] = (r, drawn[j].cpu())
            self.drawn += len(need)
        return torch.stack([self.store[i][1] for i in idx]).to(self.device, torch.float32)

    def _sample(self, unet, text, seeds, shape) -> torch.Tensor:
        module = getattr(unet, "module", unet)
        n = len(seeds)
        cond = mc.text_conditioning(self.comps, text, self.resolution).unet_kwargs(self.weight_dtype)
        uncond = None
        if self.guidance > 1.0:
            empty = {k: v.expand(n, *v.shape[1:]) for k, v in self.empty_text.items()}
            uncond = mc.text_conditioning(self.comps, empty, self.resolution).unet_kwargs(self.weight_dtype)
        fn = ds.guided_model(module, cond, uncond, self.guidance, self.weight_dtype)
        noise = ds.row_noise(seeds, len(self.schedule), tuple(shape))
        was_training = module.training
        module.eval()
        try:
            with self.autocast() if self.autocast is not None else torch.autocast("cpu", enabled=False):
                traj = ds.sample_trajectories(
                    fn, noise, self.schedule, self.alphas_cumprod, eta=1.0,
                    prediction_type=self.comps.prediction_type,
                )  # fmt: skip
        finally:
            module.train(was_training)
        return traj.final.float()

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every process's entries (gathered: a collective call, which accelerate makes on every process)."""
        from accelerate.utils import gather_object

        mine = [(i, r, lat) for i, (r, lat) in sorted(self.store.items())]
        entries = gather_object(mine)
        if not entries:
            return {"indices": torch.zeros(0, dtype=torch.long), "rounds": torch.zeros(0, dtype=torch.long),
                    "latents": torch.zeros(0)}  # fmt: skip
        entries = sorted({i: (i, r, lat) for i, r, lat in entries}.values(), key=lambda e: e[0])
        return {
            "indices": torch.tensor([e[0] for e in entries], dtype=torch.long),
            "rounds": torch.tensor([e[1] for e in entries], dtype=torch.long),
            "latents": torch.stack([e[2] for e in entries]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store = {
            int(i): (int(r), lat.clone())
            for i, r, lat in zip(
                state["indices"].tolist(), state["rounds"].tolist(), state["latents"], strict=True
            )
        }

    def describe(self) -> str:
        every = f"redrawn every {self.refresh} steps" if self.refresh else "drawn once per pair"
        return (
            f"model samples: {len(self.store):,} pairs hold a sample of the current model ({every}; "
            f"{self.drawn:,} drawn by this process, {len(self.schedule)} steps, guidance {self.guidance})"
        )

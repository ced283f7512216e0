"""The offline-pairs training step, composed of the parts in :mod:`diffalign.diffusion.parts` and
:mod:`diffalign.models.conditioning`, chosen by the objective's spec.

    batch ─► latents x0 (winners, and losers if the spec uses them) ─► per-pair (t, ε, u) from (seed, epoch, index)
          ─► conditioning (text, prompt dropout by u, SDXL time ids)
          ─► noising (spec.noising) ─► policy prediction ─► error space (spec.error_space) ─► err_θ [N]
          ─► reference prediction (if spec.needs_reference; no grad, autocast) ─► err_ref [N]
          ─► objective (spec.loss) ─► (loss [B], metrics)

Winners and losers are stacked ``[w_0..w_{B-1}, l_0..l_{B-1}]`` and share ``t`` and ``ε`` (Diffusion-DPO), unless
the spec says ``shared_noise=False`` (each image its own draw). Data with a ``caption_1`` column gives the slot-1 images
their own prompts (subject-driven tuning: reference images and generated images in one batch). A spec with
``loser_source="model_samples"`` (PSO) replaces the slot-1 latents by the current model's own samples for the caption
(:mod:`diffalign.training.model_samples`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from ..diffusion import noise as dn
from ..diffusion import parts
from ..models import conditioning as mc
from ..models import pipeline as mp
from ..objectives.inputs import PairErrors
from ..objectives.registry import ObjectiveSpec


@dataclass
class PairStep:
    """``step(batch, epoch) -> (loss [B], metrics {name: [B]})`` for one micro-batch of pairs."""

    spec: ObjectiveSpec
    params: Any
    comps: mp.Components
    unet: torch.nn.Module
    reference: Any  # context manager factory yielding the reference module, or None
    alphas_cumprod: torch.Tensor
    weight_dtype: torch.dtype
    empty_text: dict[str, torch.Tensor]
    seed: int
    prompt_dropout: float
    resolution: int
    device: torch.device
    # accelerator.autocast: the frozen reference copy is not wrapped by it
    autocast: Any = contextlib.nullcontext
    timestep_grid: tuple[int, ...] | None = None
    steps_offset: int = 0  # the scheduler's, for inverse grids (DDIMInverseScheduler)
    initial_alpha_cumprod: float | None = None
    # stored reference errors (:mod:`.reference_cache`): a batch whose pairs are all stored skips the reference
    reference_errors: Any = None
    # cache_mode lazy (:mod:`diffalign.data.lazy_cache`): completes batches and records new encodings
    latent_store: Any = None
    # spec.conditioning "user" (PPD): UserConditioning, giving each pair's user tokens for the policy's UNet call
    user_conditioning: Any = None
    # cfg.channels_last: the UNet's weights are channels-last, so its inputs are made so too
    channels_last: bool = False
    # per-run results a noising part keeps per image (NoisingContext.state): e.g. the reference's inversion grids
    noising_state: dict = field(default_factory=dict)
    # spec.loser_source "model_samples" (PSO): ModelSamples, whose samples of the current model replace slot 1
    model_samples: Any = None
    # PPD's user_pair_groups: {source row: the first row of its image pair}; the copies of a pair then draw the same
    # (t, ε, dropout uniform), keyed by that row
    noise_rows: dict[int, int] | None = None

    def _unet_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight_dtype)
        return x.to(memory_format=torch.channels_last) if self.channels_last else x

    def latents_and_text(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``latents [B, 2, C, h, w]`` float32 and text embeddings ``{name: [B, ...]}`` (cached or encoded now)."""
        if "examples" in batch:  # lazy cache: stored rows as read, the others encoded now and recorded
            latents, text = self.latent_store.complete(
                batch,
                lambda pix: mp.encode_images(self.comps, pix.to(self.device)),
                lambda captions: mp.encode_prompts(self.comps, list(captions)),
            )
            text = {k: v.to(self.device) for k, v in text.items()}
        elif "latents" in batch:
            latents = batch["latents"]
            text = {k: v.to(self.device) for k, v in batch["text"].items()}
        else:  # on the fly: encode winner and loser pixels
            pix = batch["pixel_values"]  # [B, 2, 3, H, W]
            latents = mp.encode_images(self.comps, pix.flatten(0, 1).to(self.device)).unflatten(
                0, (pix.shape[0], 2)
            )
            text = mp.encode_prompts(self.comps, list(batch["captions"]))
        # one memory layout whatever the path (a VAE may hand back channels-last latents): the UNet's kernels, hence
        # the last bits of the loss, depend on it, and cached and on-the-fly runs must agree
        return latents.to(self.device, torch.float32).contiguous(), text

    def __call__(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with record_function("diffalign/encode"):
            latents, text = self.latents_and_text(batch)
            # the slot-1 images' own prompts (a caption_1 column); text encoders are cheap next to the UNet
            text_1 = (
                mp.encode_prompts(self.comps, list(batch["captions_1"])) if "captions_1" in batch else None
            )
        if self.model_samples is not None:  # slot 1: the current model's own sample for the (slot-1) caption
            with record_function("diffalign/model_samples"):
                own = self.model_samples.latents(
                    self.unet, batch["index"], text if text_1 is None else text_1, tuple(latents.shape[2:])
                )
            latents = torch.stack([latents[:, 0], own], dim=1)
        k = 2 if self.spec.uses_losers else 1  # SFT: winners only, half the UNet work
        x0 = torch.cat([latents[:, i] for i in range(k)], dim=0)  # [kB, C, h, w]

        keys = batch["index"]
        if self.noise_rows is not None:
            keys = torch.tensor([self.noise_rows[int(i)] for i in keys.tolist()], dtype=torch.long)
        with record_function("diffalign/pair_randomness"):
            draws = [
                parts.pair_randomness(
                    keys,
                    parts.slot_seed(self.seed, slot),
                    epoch,
                    tuple(x0.shape[1:]),
                    len(self.alphas_cumprod),
                    self.spec.timesteps,
                    self.timestep_grid,
                )
                for slot in range(1 if self.spec.shared_noise else k)
            ]
        u = draws[0][2].to(self.device)  # prompt dropout: decided per pair, from the slot-0 stream
        if self.prompt_dropout > 0:  # replace captions by "" for a share of pairs (same for winner and loser)
            text = mc.drop_prompts(text, self.empty_text, u < self.prompt_dropout)
            if text_1 is not None:
                text_1 = mc.drop_prompts(text_1, self.empty_text, u < self.prompt_dropout)

        def rows(x):  # per-pair values -> the stacked layout
            return torch.cat([x] * k, dim=0)

        if self.spec.shared_noise:  # Diffusion-DPO: winner and loser share t and ε
            tk, noise_k = rows(draws[0][0]).to(self.device), rows(draws[0][1]).to(self.device)
        else:  # one (t, ε) per image
            tk = torch.cat([d[0] for d in draws]).to(self.device)
            noise_k = torch.cat([d[1] for d in draws]).to(self.device)
        if text_1 is None:
            text_k = {n: rows(v) for n, v in text.items()}
        else:  # each slot its own prompt (subject-driven data: reference image / generated image)
            text_k = {n: torch.cat([text[n], text_1[n]][:k], dim=0) for n in text}
        cond = mc.text_conditioning(
            self.comps,
            text_k,
            self.resolution,
            _image_rows(batch.get("original_sizes"), k),
            _image_rows(batch.get("crop_top_lefts"), k),
        )
        kwargs = cond.unet_kwargs(self.weight_dtype)

        def policy(x, tt, rows):
            return self.unet(self._unet_input(x), tt, **_select_rows(kwargs, rows)).sample

        def reference(x, tt, rows):
            with self.reference() as ref, self.autocast():
                return ref(self._unet_input(x), tt, **_select_rows(kwargs, rows)).sample

        ctx = parts.NoisingContext(
            self.alphas_cumprod,
            self.comps.prediction_type,
            model=policy,
            params=self.params,
            reference_model=reference if self.reference is not None else None,
            # one stream per image: (seed, epoch, pair) as for t and eps, then the slot (winner / loser); computed only
            # by a noising part that draws extra randomness, not on every Gaussian step
            row_seeds=lambda: [
                parts.pair_seed(self.seed, epoch, int(i)) ^ (0x5DEECE66D * (slot + 1))
                for slot in range(k)
                for i in keys.tolist()
            ],
            steps_offset=self.steps_offset,
            initial_alpha_cumprod=self.initial_alpha_cumprod,
            image_keys=lambda: [(int(i), slot) for slot in range(k) for i in batch["index"].tolist()],
            image_seeds=lambda: [
                parts.pair_seed(self.seed, 0, int(i)) ^ (0x5DEECE66D * (slot + 1)) ^ 0x1A3F
                for slot in range(k)
                for i in batch["index"].tolist()
            ],
            state=self.noising_state,
        )
        with record_function("diffalign/noising"):
            noisy, eps = parts.NOISINGS[self.spec.noising](x0, noise_k, tk, ctx)
        error = parts.ERROR_SPACES[self.spec.error_space]
        weighting = getattr(self.params, "error_weighting", "none")

        policy_kwargs = kwargs
        if (
            self.user_conditioning is not None
        ):  # the trained model sees the pair's user; the reference does not
            with record_function("diffalign/user_tokens"):
                tokens = self.user_conditioning.tokens(batch["index"], epoch, self.device)
            extra = {**kwargs.get("cross_attention_kwargs", {}), "user_tokens": tokens}
            policy_kwargs = {**kwargs, "cross_attention_kwargs": extra}
        with record_function("diffalign/policy_forward"):
            pred = self.unet(self._unet_input(noisy), tk, **policy_kwargs).sample
            model_err = error(pred, x0, eps, noisy, tk, ctx, weighting)
        ref_err = None
        if self.spec.needs_reference:
            stored = self.reference_errors
            if stored is not None:
                ref_err = stored.lookup(epoch, batch["index"])
            if ref_err is None:
                with record_function("diffalign/reference_forward"):
                    with self.reference() as ref, self.autocast():
                        ref_pred = ref(self._unet_input(noisy), tk, **kwargs).sample
                    ref_err = error(ref_pred, x0, eps, noisy, tk, ctx, weighting)
                if stored is not None:
                    stored.add(epoch, batch["index"], ref_err)
            else:
                ref_err = ref_err.to(model_err.device)

        label = batch.get("label_w")
        inputs = PairErrors(
            *_split(model_err, k),
            *_split(ref_err, k),
            label_w=None if label is None else label.to(self.device),
        )
        with record_function("diffalign/loss"):
            return self.spec.loss(inputs, self.params)


def _select_rows(kwargs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The UNet keyword inputs of the given batch rows (cross-attention kwargs are not per row)."""
    out = dict(kwargs)
    out["encoder_hidden_states"] = kwargs["encoder_hidden_states"][rows]
    if kwargs.get("added_cond_kwargs") is not None:
        out["added_cond_kwargs"] = {n: v[rows] for n, v in kwargs["added_cond_kwargs"].items()}
    if kwargs.get("timestep_cond") is not None:
        out["timestep_cond"] = kwargs["timestep_cond"][rows]
    return out


def _split(err: torch.Tensor | None, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if err is None:
        return None, None
    return dn.split_pair(err) if k == 2 else (err, None)


def _image_rows(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """``[B, 2, n]`` per-image values -> ``[kB, n]`` (winners, then losers when ``k = 2``)."""
    if x is None:
        return None
    return torch.cat([x[:, i] for i in range(k)], dim=0)

r"""InPO: DDIM-inversion preference optimisation (Lu et al., CVPR 2025, arXiv 2503.18454).

The loss is Diffusion-DPO's (:func:`diffalign.objectives.dpo.diffusion_dpo_loss`, official β convention) on a
different noising: each preference image is taken to ``x_t`` by DDIM inversion with the model itself, and the
implied noise ``ε̃ = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t)`` is the target (:mod:`diffalign.diffusion.inversion` has the exact
procedure of the official code). Winner and loser of a pair share ``t``; their inversions are separate (each
image has its own implied noise).

Official settings (``../shared/METHODS.md``): 10 inverse steps with the *current* model under no_grad, 0.1·σ extra
noise per step, β 2000 (SD1.5) / 5000 (SDXL), 400 steps, lr 1e-8 × batch with ``scale_lr``, SD1.5 from an SFT
checkpoint that is also the reference. ``inversion_model: reference`` inverts with the frozen reference instead
(cheaper to cache: the inverted latents then depend on the data only; ``inversion_cache: true`` keeps each
image's inversion for the run, so it is computed once instead of at every visit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dpo import DPOParams, _dpo_objective
from .registry import ObjectiveSpec


@dataclass
class InPOParams(DPOParams):
    """InPO hyperparameters: Diffusion-DPO's plus the inversion's (flat ``--flags`` and YAML keys)."""

    inversion_steps: int = field(
        default=10,
        metadata={"help": "DDIM inverse steps over the whole schedule (official: 10, i.e. every 100 steps)"},
    )
    inversion_eta: float = field(
        default=0.1,
        metadata={
            "help": "extra noise after each inverse step, times the DDIM σ of that step (official 0.1)"
        },
    )
    inversion_model: str = field(
        default="current",
        metadata={
            "help": "which network inverts: 'current' (the trained model, no grad: official) or 'reference'"
        },
    )

    inversion_exact_t: bool = field(
        default=False,
        metadata={
            "help": "one more inverse step from the last grid level to the sampled t, so the UNet at t sees a latent at "
            "noise level t (official: false, it sees the grid level below t; costs one forward pass per image)"
        },
    )

    inversion_cache: bool = field(
        default=False,
        metadata={
            "help": "invert each image once per run, with the frozen reference through the whole grid, and keep its "
            "grid latents (the cheaper variant: needs inversion_model reference; its extra noise is drawn once per "
            "image, not per epoch; memory: inversion_steps latents per image)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..errors import ConfigError

        if self.inversion_cache and self.inversion_model != "reference":
            raise ConfigError(
                "config field inversion_cache=true needs inversion_model: reference (the current model changes "
                "every step, so its inversions cannot be kept)"
            )

        if self.inversion_cache and self.inversion_exact_t:
            raise ConfigError(
                "config field inversion_exact_t=true needs inversion_cache: false (the cache keeps grid levels only)"
            )
        if self.inversion_steps < 1:
            raise ConfigError(f"config field inversion_steps must be >= 1, got {self.inversion_steps}")
        if self.inversion_eta < 0:
            raise ConfigError(f"config field inversion_eta must be >= 0, got {self.inversion_eta}")
        if self.inversion_model not in ("current", "reference"):
            raise ConfigError(
                f"config field inversion_model={self.inversion_model!r} is not valid; choose one of "
                "['current', 'reference']"
            )

    def check_run(self, cfg) -> None:
        """Run fields the cached inversion cannot work with (called by the offline config)."""
        from ..errors import ConfigError

        if not self.inversion_cache:
            return
        for name in ("random_flip", "random_crop"):
            if getattr(cfg, name):
                raise ConfigError(
                    f"config field inversion_cache=true needs {name}: false (a kept inversion is of one fixed image)"
                )
        if cfg.prompt_dropout > 0:
            raise ConfigError(
                "config field inversion_cache=true needs prompt_dropout: 0 (a kept inversion is under one caption)"
            )


SPECS = {
    "inpo": ObjectiveSpec(
        name="inpo",
        loss=_dpo_objective,
        params=InPOParams,
        description="InPO (Lu et al. 2025): Diffusion-DPO on the noise implied by DDIM inversion of each image",
        inputs="pair_errors",
        needs_reference=True,
        noising="ddim_inversion",
        metric_prefix="dpo",
    ),
}

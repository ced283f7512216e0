"""Pure loss functions: per-sample errors and keyword hyperparameters in, ``(per_sample_loss[B], metrics)`` out.

One module per method family; no accelerator, config or model here (the training loop reduces and logs).
"""

from diffalign.objectives.dpo import (
    BETA_CONVENTIONS,
    DPO_METRICS,
    LOSS_TYPES,
    diffusion_dpo_loss,
    official_beta,
    sft_loss,
)

__all__ = [
    "BETA_CONVENTIONS",
    "DPO_METRICS",
    "LOSS_TYPES",
    "diffusion_dpo_loss",
    "official_beta",
    "sft_loss",
]

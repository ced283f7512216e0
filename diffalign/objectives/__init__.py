"""Objectives: pure loss functions plus their registry.

Per-sample errors (or log-probs) and a hyperparameter dataclass in, ``(per_sample_loss[B], metrics)`` out; no
accelerator, config or model here (the training loop reduces and logs). :func:`get_objective` returns a method's
:class:`ObjectiveSpec`, which tells the loop what the method needs.
"""

from diffalign.objectives.dpo import (
    BETA_CONVENTIONS,
    DPO_METRICS,
    LOSS_TYPES,
    DPOParams,
    diffusion_dpo_loss,
    official_beta,
    sft_loss,
)
from diffalign.objectives.inputs import PairErrors
from diffalign.objectives.registry import OBJECTIVE_MODULES, ObjectiveSpec, get_objective, objective_names

__all__ = [
    "BETA_CONVENTIONS",
    "DPO_METRICS",
    "LOSS_TYPES",
    "OBJECTIVE_MODULES",
    "DPOParams",
    "ObjectiveSpec",
    "PairErrors",
    "diffusion_dpo_loss",
    "get_objective",
    "objective_names",
    "official_beta",
    "sft_loss",
]

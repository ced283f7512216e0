"""The objective registry: a method is a name looked up here, and its :class:`ObjectiveSpec` says what it needs.

A loop never asks "which method is this?"; it reads the spec: whether a reference model is needed, which inputs the
loss takes, whether the losers go through the UNet, which timestep distribution, noising and error space the step
uses, whether the two images of a pair share their noise, and the prefix of the method's metrics. The method's hyperparameters are a dataclass of its own (fields with
help texts); the command line and the YAML recipes expose its fields as flat ``--flags`` next to the common ones.

Adding a method: write ``diffalign/objectives/<method>.py`` with the loss, its hyperparameter dataclass and a
``SPECS = {name: ObjectiveSpec(...)}`` dict, add one line to :data:`OBJECTIVE_MODULES`, and a ``configs/`` recipe
(``docs/architecture.md``). Modules are imported lazily, and objective files import torch lazily, so building the
command line stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: objective name -> module that defines it (in its ``SPECS`` dict).
OBJECTIVE_MODULES: dict[str, str] = {
    "dpo": "diffalign.objectives.dpo",
    "sft": "diffalign.objectives.dpo",
    "inpo": "diffalign.objectives.inpo",
    "prdp": "diffalign.objectives.prdp",
    "ddpo": "diffalign.objectives.ddpo",
    "dreambooth": "diffalign.objectives.dreambooth",
    "dreambooth_prior": "diffalign.objectives.dreambooth",
    "rpo": "diffalign.objectives.rpo",
    "ppd": "diffalign.objectives.ppd",
    "pso": "diffalign.objectives.pso",
    "pso_hinge": "diffalign.objectives.pso",
    "pso_pairs": "diffalign.objectives.pso",
    "pso_online": "diffalign.objectives.pso",
}

INPUTS = ("pair_errors", "winner_errors", "trajectory_logprobs")
LOOPS = ("offline_pairs", "online")
TIMESTEPS = ("uniform", "grid")
NOISINGS = ("gaussian", "ddim_inversion")
ERROR_SPACES = ("target", "x0")
SUBJECT_PAIRS = ("context", "class")
CONDITIONINGS = ("text", "user")
LOSER_SOURCES = ("data", "model_samples")


@dataclass
class NoParams:
    """A method without hyperparameters of its own."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What a method needs from the loop; the loop reads it instead of branching on the method's name.

    ``loss(inputs, params) -> (loss[B], metrics {name: [B]})``: ``inputs`` is a :class:`~diffalign.objectives.
    inputs.PairErrors` for ``inputs="pair_errors"``/``"winner_errors"``, a :class:`~diffalign.objectives.inputs.
    TrajectoryLogProbs` for ``inputs="trajectory_logprobs"`` (online methods); ``params`` an instance of ``params``.
    The loop reduces the returned loss with ``.mean()``.

    Online methods (``loop="online"``) may also declare ``prepare_rewards(rewards [M], prompts [M], params, state)
    -> advantages [M]``, called once per epoch on the rewards of every process (gathered), with ``state`` a
    JSON-serialisable dict the loop keeps in its checkpoints (e.g. DDPO's per-prompt statistics); and
    ``min_images_per_prompt`` (PRDP compares images of one prompt, so it needs at least 2).
    """

    name: str
    loss: Callable[[Any, Any], tuple[Any, dict[str, Any]]]
    description: str
    params: type = NoParams
    loop: str = "offline_pairs"
    inputs: str = "pair_errors"
    needs_reference: bool = True
    timesteps: str = "uniform"
    noising: str = "gaussian"
    error_space: str = "target"
    metric_prefix: str = "dpo"
    # Diffusion-DPO: winner and loser share t and ε. False: each image draws its own (DreamBooth, RPO as coded)
    shared_noise: bool = True
    # subject-driven methods: what scripts/train_subjects.py puts in slot 1 next to the reference images —
    # "context" (base images for context prompts, λ-Harmonic labels: RPO) or "class" (class images: DreamBooth)
    subject_pairs: str | None = None
    prepare_rewards: Callable[..., Any] | None = None
    min_images_per_prompt: int = 1
    # what the trained model is conditioned on besides the text: "user" adds user tokens from k other pairs of the
    # pair's user through a decoupled cross-attention (PPD: diffalign/training/user_conditioning.py)
    conditioning: str = "text"
    # where slot 1 of a pair comes from: "data" (the loser of the pair), or "model_samples" — a sample of the current
    # model for the pair's caption, redrawn every few steps (PSO: diffalign/training/model_samples.py)
    loser_source: str = "data"

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("loop", self.loop, LOOPS),
            ("inputs", self.inputs, INPUTS),
            ("timesteps", self.timesteps, TIMESTEPS),
            ("noising", self.noising, NOISINGS),
            ("error_space", self.error_space, ERROR_SPACES),
            ("subject_pairs", self.subject_pairs, (None, *SUBJECT_PAIRS)),
            ("conditioning", self.conditioning, CONDITIONINGS),
            ("loser_source", self.loser_source, LOSER_SOURCES),
        ):
            if value not in valid:
                raise ValueError(f"ObjectiveSpec {self.name!r}: {field}={value!r}; valid: {list(valid)}")
        if not dataclasses.is_dataclass(self.params):
            raise TypeError(f"ObjectiveSpec {self.name!r}: params must be a dataclass type")

    @property
    def uses_losers(self) -> bool:
        """Whether the losers go through the UNet (SFT trains on winners only: half the compute)."""
        return self.inputs == "pair_errors"


def objective_names() -> list[str]:
    return sorted(OBJECTIVE_MODULES)


def subject_objectives() -> list[str]:
    """The objectives ``scripts/train_subjects.py`` runs (their spec names a ``subject_pairs`` stream)."""
    return [n for n in objective_names() if get_objective(n).subject_pairs is not None]


def get_objective(name: str) -> ObjectiveSpec:
    """The spec registered as ``name``; an unknown name raises :class:`ConfigError` listing the valid ones."""
    if name not in OBJECTIVE_MODULES:
        raise ConfigError(
            f"config field objective={name!r} is not a known objective; choose one of {objective_names()}"
        )
    module = importlib.import_module(OBJECTIVE_MODULES[name])
    return module.SPECS[name]


def params_from_dict(spec: ObjectiveSpec, values: dict[str, Any]) -> Any:
    """The method's hyperparameter dataclass from the fields of ``values`` it declares (others are ignored)."""
    names = {f.name for f in dataclasses.fields(spec.params)}
    return spec.params(**{k: v for k, v in values.items() if k in names})

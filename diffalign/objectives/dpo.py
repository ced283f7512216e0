r"""Diffusion-DPO and its SFT baseline as pure functions of per-sample denoising errors.

Reference: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", 2023, arXiv 2311.12908.

Paper equation (their Eq. 14, with the expectation over t ~ U{0..T−1} and ε ~ N(0, I) shared by both images)::

    L(θ) = − E log σ( −β T ω(λ_t) · [ ‖ε − ε_θ(x^w_t, t)‖² − ‖ε − ε_ref(x^w_t, t)‖²
                                    − (‖ε − ε_θ(x^l_t, t)‖² − ‖ε − ε_ref(x^l_t, t)‖²) ] )

Implementation convention ("official", the authors' released code). With per-sample **mean** errors
``err = mean_{C,H,W} (target − prediction)²`` (:func:`diffalign.diffusion.per_sample_mse`)::

    Δ      = (err_θ(w) − err_ref(w)) − (err_θ(l) − err_ref(l))
    inside = −0.5 · β · Δ                 # = β · z with z = −Δ / 2 the unscaled implicit log-ratio margin
    loss   = −log σ(inside)

β absorbs T·ω(λ_t), the ½ and the pixel-mean normalisation; β = 5000 reproduces the released SD1.5/SDXL checkpoints
(the paper reports 2000–5000 working). The diffusers research script writes the same objective as
``β' · (ref_diff − model_diff) = −β'·Δ`` with β' = 2500, i.e. **β' = β / 2**. Pass ``beta_convention="diffusers"``
to give β' (it is converted with ``β = 2·β'``); all formulas below use the official β.

Implicit rewards (per image, official convention): ``r_w = −0.5·β·(err_θ(w) − err_ref(w))`` and likewise ``r_l``;
``inside = r_w − r_l`` is the reward margin. It is 0 when the model equals the reference.

Soft labels (ties kept with ``tie_policy: keep``): with ``p`` the probability that the slot-0 image is preferred,
the sigmoid loss is the cross-entropy ``−p·log σ(inside) − (1−p)·log σ(−inside)``; ``p = 1`` is the usual loss and
``p = 0.5`` has its minimum at ``inside = 0``: a tie pulls the margin to zero instead of training "image 0 wins".

Every loss returns the **unreduced** per-pair loss ``Tensor[B]`` and a dict of detached per-pair metrics ``Tensor[B]``;
the training loop reduces (mean), gathers across processes and logs them as ``dpo/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.lazy import lazy_module
from .inputs import PairErrors
from .registry import NoParams, ObjectiveSpec

torch = lazy_module("torch")  # imported on first use: building the command line must not wait for torch
F = lazy_module("torch.nn.functional")

LOSS_TYPES = ("sigmoid", "hinge", "ipo")

#: Factor that converts a β given in each convention to the official β (official β = factor · given β).
BETA_CONVENTIONS: dict[str, float] = {"official": 1.0, "diffusers": 2.0}

#: Names of the metrics returned by :func:`diffusion_dpo_loss` (log them as ``dpo/<name>``).
DPO_METRICS = (
    "implicit_acc",
    "reward_margin",
    "reward_w",
    "reward_l",
    "model_err_w",
    "model_err_l",
    "ref_err_w",
    "ref_err_l",
)


def official_beta(beta: float, beta_convention: str = "official") -> float:
    """Convert β from ``beta_convention`` to the official convention (``"diffusers"``: β_official = 2·β')."""
    if beta_convention not in BETA_CONVENTIONS:
        raise ValueError(
            f"Unknown beta_convention {beta_convention!r}; valid: {', '.join(BETA_CONVENTIONS)} "
            "('official': inside = -0.5·β·Δ, β=5000 for the released checkpoints; "
            "'diffusers': β'·(ref_diff − model_diff), β' = β/2 = 2500)."
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta}); the official Diffusion-DPO value is 5000.")
    return float(beta) * BETA_CONVENTIONS[beta_convention]


def _check_errors(**errors: torch.Tensor) -> None:
    shapes = {name: tuple(e.shape) for name, e in errors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(
            f"diffusion_dpo_loss expects four per-pair error vectors of the same shape [B] (one value per pair, "
            f"e.g. from diffalign.diffusion.per_sample_mse then split_pair), got shapes {shapes}."
        )


def _implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    """1 where ``inside > 0`` (model prefers the winner more than the reference does), 0 where < 0, 0.5 on ties.

    Ties score 0.5 because ``inside == 0`` exactly is what an untrained policy (θ = reference) gives: chance level,
    neither right nor wrong.
    """
    return (torch.sign(inside) + 1.0) / 2.0


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    beta_convention: str = "official",
    label_w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Diffusion-DPO loss per pair (see the module docstring for the equation and the β conventions).

    Args:
        model_err_w, model_err_l: ``Tensor[B]`` per-sample mean errors of the trained model on winners / losers
            (must carry the graph; the gradient flows only through these).
        ref_err_w, ref_err_l: ``Tensor[B]`` same for the reference model. Compute them under ``torch.no_grad()``;
            they are also ``.detach()``-ed here so the reference can never receive gradient.
        beta: inverse temperature in ``beta_convention`` units (default 5000, official).
        loss_type: one of :data:`LOSS_TYPES`, with ``inside = −0.5·β·Δ`` and ``z = inside / β = −Δ/2``:

            - ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``−(1−ε)·log σ(inside) − ε·log σ(−inside)``; ε is
              ``label_smoothing`` ("conservative"/robust DPO: the label is assumed flipped with probability ε).
            - ``"hinge"`` (SLiC-style): ``relu(1 − inside)``.
            - ``"ipo"`` (Azar et al. 2023, Eq. 17): ``(z − 1/(2β))²`` where ``z = −Δ/2`` is the *unscaled* implicit
              log-ratio margin (the quantity the official β multiplies) and IPO's regulariser τ is the official β
              (after alias conversion, so β' = 2500 in the diffusers convention gives the same IPO loss as β = 5000).
              Equivalently ``(inside − ½)² / β²``: IPO regresses the official-convention margin to ½ instead of
              pushing it to +∞. Its values and gradients are ~β² smaller than the sigmoid loss's at the same β,
              so re-tune the learning rate when switching to it. (The public diffusers script's ``ipo`` branch
              reads an undefined argument and cannot run; this is the form it evidently meant, with the official β.)
        label_smoothing: ε in ``[0, 0.5)``; only meaningful for ``"sigmoid"`` (any other loss with ε ≠ 0 raises).
        beta_convention: ``"official"`` or ``"diffusers"`` (β' = β/2; see :data:`BETA_CONVENTIONS`).
        label_w: ``Tensor[B]`` probability ``p`` that the slot-0 image is preferred (1 = decided pair, the default;
            0.5 = tie). With ε label smoothing the label becomes ``q = p·(1−ε) + (1−p)·ε``; sigmoid:
            ``−q·log σ(inside) − (1−q)·log σ(−inside)``; hinge: ``p·relu(1 − inside) + (1−p)·relu(1 + inside)``;
            ipo: ``(z − (p − ½)/β)²`` (IPO's target for a preference probability ``p``; ``1/(2β)`` when ``p = 1``,
            ``0`` for a tie).

    Returns:
        ``(loss[B], metrics)`` with float32 per-pair tensors; metrics (all detached, names in :data:`DPO_METRICS`):
        ``implicit_acc`` (1 if inside > 0, 0 if < 0, 0.5 on exact ties), ``reward_margin`` (= inside = r_w − r_l),
        ``reward_w``, ``reward_l`` (implicit rewards ``−0.5·β·(err_θ − err_ref)``), and the four input errors
        ``model_err_w``, ``model_err_l``, ``ref_err_w``, ``ref_err_l``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (probability that a preference label is flipped), got "
            f"{label_smoothing}."
        )
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} is only defined for loss_type='sigmoid' (got {loss_type!r}); "
            "set it to 0 or use the sigmoid loss."
        )
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    b = official_beta(beta, beta_convention)

    # float32: the margin is a small difference of ~0.1-sized errors (see per_sample_mse).
    m_w, m_l = model_err_w.float(), model_err_l.float()
    r_w, r_l = ref_err_w.detach().float(), ref_err_l.detach().float()

    reward_w = -0.5 * b * (m_w - r_w)
    reward_l = -0.5 * b * (m_l - r_l)
    inside = reward_w - reward_l  # = -0.5 · β · Δ

    if label_w is None:
        p = None
    else:
        if tuple(label_w.shape) != tuple(m_w.shape) or bool(((label_w < 0) | (label_w > 1)).any()):
            raise ValueError(f"label_w must be probabilities in [0, 1] of shape {tuple(m_w.shape)}")
        p = label_w.to(m_w.device, torch.float32)
    if loss_type == "sigmoid":
        q = (
            (1.0 - label_smoothing)
            if p is None
            else p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing
        )
        loss = -q * F.logsigmoid(inside)
        if label_smoothing or p is not None:
            loss = loss - (1.0 - q) * F.logsigmoid(-inside)
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - inside)
        if p is not None:
            loss = p * loss + (1.0 - p) * torch.relu(1.0 + inside)
    else:  # ipo
        z = -0.5 * ((m_w - r_w) - (m_l - r_l))  # unscaled margin; inside == b * z
        target = 1.0 / (2.0 * b) if p is None else (p - 0.5) / b
        loss = (z - target) ** 2

    metrics = {
        "implicit_acc": _implicit_accuracy(inside.detach()),
        "reward_margin": inside.detach(),
        "reward_w": reward_w.detach(),
        "reward_l": reward_l.detach(),
        "model_err_w": m_w.detach(),
        "model_err_l": m_l.detach(),
        "ref_err_w": r_w,
        "ref_err_l": r_l,
    }
    return loss, metrics


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning baseline of Diffusion-DPO: the plain denoising loss on the winners only.

    Args:
        model_err_w: ``Tensor[B]`` per-sample mean errors of the trained model on the preferred images.

    Returns:
        ``(loss[B], {"model_err_w": Tensor[B]})`` with ``loss = model_err_w`` (float32); the metric is detached.
    """
    if model_err_w.dim() != 1:
        raise ValueError(f"sft_loss expects per-sample errors of shape [B], got {tuple(model_err_w.shape)}.")
    loss = model_err_w.float()
    return loss, {"model_err_w": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# Registry entries (diffalign.objectives.registry)


@dataclass
class DPOParams:
    """Diffusion-DPO hyperparameters (flat ``--flags`` and YAML keys)."""

    beta: float = field(
        default=5000.0, metadata={"help": "KL strength β in the official convention (paper: 2000-5000)"}
    )
    beta_convention: str = field(
        default="official", metadata={"help": "'official' (Wallace et al. code) or 'diffusers' (β' = β/2)"}
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss variant: sigmoid, hinge or ipo"})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "robust/conservative DPO label smoothing ε in [0, 0.5); sigmoid loss only"},
    )

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"config field loss_type={self.loss_type!r} is not valid; choose one of {list(LOSS_TYPES)}"
            )
        if self.beta_convention not in BETA_CONVENTIONS:
            raise ConfigError(
                f"config field beta_convention={self.beta_convention!r} is not valid; choose one of "
                f"{list(BETA_CONVENTIONS)}"
            )
        if not self.beta > 0:
            raise ConfigError(
                f"config field beta must be > 0, got {self.beta} (the official Diffusion-DPO value is 5000)"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config field label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(
                f"config field label_smoothing={self.label_smoothing} works only with loss_type sigmoid, not "
                f"{self.loss_type!r}: set label_smoothing 0 or loss_type sigmoid"
            )


def _dpo_objective(x: PairErrors, p: DPOParams):
    return diffusion_dpo_loss(
        x.model_w,
        x.model_l,
        x.ref_w,
        x.ref_l,
        beta=p.beta,
        loss_type=p.loss_type,
        label_smoothing=p.label_smoothing,
        beta_convention=p.beta_convention,
        label_w=x.label_w,
    )


def _sft_objective(x: PairErrors, p: NoParams):
    return sft_loss(x.model_w)


SPECS = {
    "dpo": ObjectiveSpec(
        name="dpo",
        loss=_dpo_objective,
        params=DPOParams,
        description="Diffusion-DPO (Wallace et al. 2023): ELBO-based implicit rewards of winner and loser",
        inputs="pair_errors",
        needs_reference=True,
        metric_prefix="dpo",
    ),
    "sft": ObjectiveSpec(
        name="sft",
        loss=_sft_objective,
        description="SFT baseline of Diffusion-DPO: the denoising loss on the winners only",
        inputs="winner_errors",
        needs_reference=False,
        metric_prefix="train",
    ),
}

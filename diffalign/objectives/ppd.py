r"""PPD: personalised preference fine-tuning (Dang et al., CVPR 2025, arXiv 2501.06655; no public code).

The loss is Diffusion-DPO's (:func:`diffalign.objectives.dpo.diffusion_dpo_loss`, official β convention), summed
over many users' pairs; what changes is the conditioning of the trained model. Every pair of user ``u`` is trained
with a **user embedding** read from ``k`` *other* pairs of ``u`` (caption, preferred, rejected): a frozen encoder
featurises each context pair, a trainable projector maps the ``k`` features to ``N`` user tokens
(:mod:`diffalign.models.user_encoder`), and the tokens enter every cross-attention of the UNet through a second,
decoupled key/value projection whose output is added to the text attention's (:mod:`diffalign.models.user_attention`,
IP-Adapter style). The reference is the base model without the user branch (LoRA off, no user tokens), so the DPO
margin measures how much the personalised model moves towards *this user's* winner.

Trained: the LoRA (or the full UNet), the user branch's key/value projections and the projector; frozen: the pair
encoder (features computed once per run). The context pairs of a training pair are drawn from the generator of
(seed, epoch, pair), so a resumed run draws the same (:mod:`diffalign.training.user_conditioning`). At inference, k
pairs of an unseen user give its tokens (``scripts/eval_ppd.py``). ``user_context_split: questionnaire`` takes the
context from a split where every user answers the same few questions instead (:mod:`diffalign.data.ppd_questionnaire`):
then training and evaluation read a user from the same kind of pairs as the demo asks a visitor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dpo import DPOParams, _dpo_objective
from .registry import ObjectiveSpec


@dataclass
class PPDParams(DPOParams):
    """PPD hyperparameters: Diffusion-DPO's plus the user encoder's (flat ``--flags`` and YAML keys)."""

    user_encoder: str = field(
        default="sandbox-clip",
        metadata={
            "help": "frozen pair encoder: a CLIP reward catalog name or CLIP directory ('sandbox-clip' on the "
            "sandbox), or 'vlm:<path>' for a transformers vision-language model's hidden states (the paper)"
        },
    )
    user_encoder_layer: int = field(
        default=-1, metadata={"help": "vlm encoders: which hidden-state layer is read (-1: the last)"}
    )
    user_context_pairs: int = field(
        default=4, metadata={"help": "k: other pairs of the same user that make a pair's user embedding"}
    )
    user_context_split: str = field(
        default="",
        metadata={
            "help": "where a pair's context comes from: '' = k other pairs of its user in the training split (the "
            "paper); a split name (e.g. 'questionnaire') = k of its user's rows in that split of the same dataset, "
            "which evaluation then also reads for unseen users"
        },
    )
    user_tokens: int = field(default=4, metadata={"help": "N: user tokens per embedding"})
    user_projector_hidden: int = field(default=256, metadata={"help": "hidden width of the projector"})
    user_projector_odd: bool = field(
        default=True,
        metadata={
            "help": "make the user tokens an odd function of the choices (diffalign/models/odd_projector.py): "
            "answering every context pair the other way negates them; false: the plain projector"
        },
    )
    user_scale: float = field(
        default=1.0, metadata={"help": "scale of the user cross-attention's output (training and evaluation)"}
    )
    user_branch_init: str = field(
        default="zero",
        metadata={
            "help": "how the user branch's key/value projections start: 'zero' (value 0, the branch starts as a "
            "no-op) or 'text' (IP-Adapter's: copies of the layer's text key/value projections)"
        },
    )
    user_vocab: list[str] = field(
        default_factory=list,
        metadata={
            "help": "phrases the user tokens are mixtures of (diffalign/models/vocab_projector.py; needs "
            "user_branch_init 'text'), e.g. [large, small, on a black background]; []: tokens anywhere in the text "
            "space (the plain projector)"
        },
    )
    user_vocab_fit_steps: int = field(
        default=0,
        metadata={
            "help": "with user_vocab and a questionnaire context: first fit the projector for this many full-batch "
            "Adam steps as a per-user preference model (each user's phrase weights score its training pairs in the "
            "pair encoder's CLIP space, Bradley-Terry), then freeze it, so DPO trains the branch to draw what the "
            "tokens say; 0: the projector learns from the DPO loss only"
        },
    )
    user_token_dropout: float = field(
        default=0.0,
        metadata={
            "help": "probability that a training pair gets zero user tokens (drawn per pair and epoch, seeded): "
            "the LoRA then has to explain the shared preference alone and the user branch only what differs "
            "between users (IP-Adapter drops its image tokens the same way); 0: never"
        },
    )
    user_pair_groups: bool = field(
        default=False,
        metadata={
            "help": "batch the copies of an image pair that different users labelled together, with the same "
            "timestep and noise (grouped by image_0_uid/image_1_uid): within a group only the user tokens differ, "
            "so the gradient that tells users apart is not buried in the noise of separate draws; false: every "
            "row shuffled and noised on its own (the paper)"
        },
    )
    user_eval_users: int | None = field(
        default=None, metadata={"help": "evaluate on the first N unseen users of the data (None: all)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..errors import ConfigError

        for name in ("user_context_pairs", "user_tokens", "user_projector_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.user_scale < 0:
            raise ConfigError(f"config field user_scale must be >= 0, got {self.user_scale}")
        if self.user_branch_init not in ("zero", "text"):
            raise ConfigError(
                f"config field user_branch_init must be 'zero' or 'text', got {self.user_branch_init!r}"
            )
        if self.user_vocab and self.user_branch_init != "text":
            raise ConfigError(
                "config field user_vocab needs user_branch_init: text (the branch must read the phrase mixtures as "
                "the text attention reads words)"
            )
        if any(not isinstance(p, str) or not p.strip() for p in self.user_vocab):
            raise ConfigError(f"config field user_vocab needs non-empty phrases, got {self.user_vocab!r}")
        if self.user_vocab_fit_steps < 0:
            raise ConfigError(
                f"config field user_vocab_fit_steps must be >= 0, got {self.user_vocab_fit_steps}"
            )
        if self.user_vocab_fit_steps and not (self.user_vocab and self.user_context_split):
            raise ConfigError(
                "config field user_vocab_fit_steps needs user_vocab (phrases to fit) and user_context_split (a "
                "fixed context per user, e.g. questionnaire)"
            )
        if not 0.0 <= self.user_token_dropout < 1.0:
            raise ConfigError(
                f"config field user_token_dropout must be in [0, 1), got {self.user_token_dropout}"
            )

    def check_run(self, cfg) -> None:
        """Run fields user conditioning cannot work with (called by the offline config)."""
        from ..errors import ConfigError

        if cfg.finetune != "lora" and not cfg.skip_eval:
            raise ConfigError(
                "objective ppd evaluates against the base by switching the LoRA off: with finetune full set "
                "skip_eval true (and compare with scripts/eval_ppd.py), or use finetune lora"
            )
        if cfg.streaming:
            raise ConfigError(
                "objective ppd needs an indexed dataset (a pair's context is drawn from its user's other pairs): "
                "set streaming false"
            )


SPECS = {
    "ppd": ObjectiveSpec(
        name="ppd",
        loss=_dpo_objective,
        params=PPDParams,
        description="PPD (Dang et al. 2025): multi-user Diffusion-DPO with user tokens through decoupled "
        "cross-attention",
        inputs="pair_errors",
        needs_reference=True,
        conditioning="user",
        metric_prefix="dpo",
    ),
}

"""User conditioning of the offline step (``ObjectiveSpec.conditioning == "user"``: PPD).

Set-up (:meth:`UserConditioning.build`, before the optimizer is built):

* the decoupled user cross-attention is installed on the trained UNet (:func:`~diffalign.models.user_attention.
  add_user_attention`), its key/value projections trainable;
* a :class:`~diffalign.models.user_encoder.UserProjector` becomes a submodule of the UNet (``unet.user_projector``),
  so the optimizer, gradient clipping, DDP's gradient averaging and full-UNet checkpoints include it with no code of
  their own; LoRA checkpoints, which hold only the adapters, get the user modules through
  :meth:`UserConditioning.state_dict` (``accelerator.register_for_checkpointing``);
* the frozen pair encoder featurises every decided pair of the training split once (``[P, F]``, preferred first).

Per micro-batch (:meth:`UserConditioning.tokens`): for each pair (source row ``r`` of user ``u``), ``k`` other decided
pairs of ``u`` are drawn without replacement from the generator of (seed, epoch, r) — so a resumed run draws the
same — and the projector maps their features to the pair's ``N`` user tokens. With ``user_context_split`` set
(e.g. ``questionnaire``), the ``k`` come from ``u``'s decided rows of that split instead (all of them when it has
``k`` or fewer). A user with fewer than ``k`` other
pairs gets the ones there are (masked); one with none gets zero tokens (the user branch then adds nothing). The
tokens go to the policy's UNet call only; the reference (LoRA off, no tokens) is the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.parts import pair_seed
from ..errors import ConfigError

CONTEXT_STREAM = 0x9E3779B1  # xor'ed into the pair seed: the context draw has a stream of its own
DROPOUT_STREAM = 0x85EBCA6B  # and the user-token dropout draw another


def make_featurizer(params: Any, device: torch.device | str = "cpu"):
    """The frozen pair encoder ``params.user_encoder`` names (see :class:`~diffalign.objectives.ppd.PPDParams`)."""
    from ..models import user_encoder as ue

    name = params.user_encoder
    if (
        name == "sandbox-attributes"
    ):  # the sandbox's perception stand-in for a VLM (labelled as such in results)
        from ..sandbox.pair_perception import AttributePairFeaturizer

        return AttributePairFeaturizer()
    if name.startswith("vlm:"):
        return ue.VLMHiddenStateFeaturizer(name[4:], layer=params.user_encoder_layer, device=device)
    return ue.ClipPairFeaturizer(name, device=device)


class UserConditioning:
    """Context features of the training split, the per-user rows, and the trainable user modules of one run."""

    def __init__(self, unet, projector, featurizer, features: torch.Tensor, row_users: np.ndarray,
                 user_rows: dict[int, np.ndarray], params: Any, seed: int):  # fmt: skip
        self.unet, self.projector, self.featurizer = unet, projector, featurizer
        self.features = features  # [rows of the context split, F]; rows that are not decided pairs hold zeros
        self.row_users = row_users  # [num source rows] user id per source row
        self.user_rows = user_rows  # user id -> decided context-split rows of that user (sorted)
        self.params, self.seed = params, seed
        self.k = params.user_context_pairs
        self.separate = bool(getattr(params, "user_context_split", ""))  # context rows are of another split

    # ---- set-up ----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg, run) -> UserConditioning:
        from ..data.sources import resolve_dataset
        from ..data.splits import load_pickapic_split
        from ..models import user_attention as ua
        from ..models import user_encoder as ue

        params = cfg.params
        data = load_pickapic_split(resolve_dataset(cfg.dataset), cfg.split)
        missing = [
            c for c in ("user_id", "caption", "jpg_0", "jpg_1", "label_0") if c not in data.column_names
        ]
        if missing:
            raise ConfigError(
                f"objective ppd needs the columns user_id, caption, jpg_0, jpg_1, label_0; dataset {cfg.dataset!r} "
                f"split {cfg.split!r} lacks {missing}"
            )
        users = np.asarray(data["user_id"], dtype=np.int64)
        train_data = data
        # the context may come from another split of the same data (a questionnaire)
        if params.user_context_split:
            try:
                data = load_pickapic_split(resolve_dataset(cfg.dataset), params.user_context_split)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(
                    f"config field user_context_split={params.user_context_split!r}: dataset {cfg.dataset!r} has "
                    f"no such split ({err}); use '' (the training split) or a split the data has"
                ) from None
            if "user_id" not in data.column_names:
                raise ConfigError(f"user_context_split {params.user_context_split!r} has no user_id column")
        context_users = np.asarray(data["user_id"], dtype=np.int64)
        labels = np.asarray(data["label_0"], dtype=np.float64)
        decided = np.flatnonzero(np.abs(labels - 0.5) > 1e-6)  # ties carry no direction: never context
        user_rows: dict[int, list[int]] = {}
        for r in decided.tolist():
            user_rows.setdefault(int(context_users[r]), []).append(r)
        per_user = np.array([len(v) for v in user_rows.values()]) if user_rows else np.zeros(1)
        if per_user.max() < (1 if params.user_context_split else 2):
            raise ConfigError(
                f"objective ppd: dataset {cfg.dataset!r} split {cfg.split!r} has no user with 2 or more decided "
                "pairs, so no pair has context from its user: use data with several pairs per user_id"
            )
        acc = run.accelerator
        featurizer = make_featurizer(params, acc.device)
        acc.print(
            f"user conditioning: featurising {len(decided)} decided pairs of {len(user_rows)} users "
            f"(pairs per user: min {per_user.min()}, median {int(np.median(per_user))}, max {per_user.max()}) "
            f"with {params.user_encoder}"
        )
        sub = data.select(decided.tolist())
        table = ue.pair_features_table(
            featurizer, sub["caption"], sub["jpg_0"], sub["jpg_1"], labels[decided],
            progress=acc.is_local_main_process,
        )  # fmt: skip
        features = torch.zeros(len(data), table.shape[1])
        features[torch.from_numpy(decided)] = table
        unet = run.unet
        token_dim = unet.config.cross_attention_dim
        projector = ue.make_projector(
            featurizer.dim, params.user_tokens, token_dim, params.user_projector_hidden,
            odd_dims=getattr(featurizer, "odd_dims", 0) if params.user_projector_odd else 0, seed=cfg.seed,
            vocab_size=len(params.user_vocab),
        ).to(run.device)  # fmt: skip
        if params.user_vocab:  # tokens are mixtures of these phrases' text states (vocab_projector.py)
            from ..models.vocab_projector import phrase_embeddings

            projector.set_vocab(phrase_embeddings(run.comps, params.user_vocab), params.user_vocab)
            if params.user_vocab_fit_steps:
                _fit_vocab(projector, featurizer, train_data, features, user_rows, params, acc)
        ua.add_user_attention(
            unet, user_dim=token_dim, scale=params.user_scale, seed=cfg.seed, init=params.user_branch_init
        )
        for proc in ua.user_processors(unet).values():  # trainable weights in float32, as LoRA adapters are
            proc.to(dtype=torch.float32)
        unet.add_module("user_projector", projector)
        rows = {u: np.asarray(v, dtype=np.int64) for u, v in user_rows.items()}
        without = len(set(users.tolist()) - set(rows))
        if params.user_context_split and without:
            acc.print(f"user conditioning: {without} training users have no rows in {params.user_context_split!r} "
                      "(their pairs train with zero user tokens)")  # fmt: skip
        out = cls(unet, projector, featurizer, features, users, rows, params, cfg.seed)
        acc.register_for_checkpointing(out)
        return out

    # ---- per step --------------------------------------------------------------------------------------------
    def context_rows(self, index: int, epoch: int) -> np.ndarray:
        """The source rows whose features make pair ``index``'s user embedding in ``epoch``."""
        rows = self.user_rows.get(int(self.row_users[index]))
        if rows is None:
            return np.zeros(0, dtype=np.int64)
        others = rows if self.separate else rows[rows != index]  # another split: all of the user's rows
        if len(others) <= self.k:
            return others
        g = torch.Generator().manual_seed(pair_seed(self.seed, epoch, int(index)) ^ CONTEXT_STREAM)
        pick = torch.randperm(len(others), generator=g)[: self.k].sort().values.numpy()
        return others[pick]

    def dropped(self, index: int, epoch: int) -> bool:
        """Whether pair ``index`` trains without user tokens in ``epoch`` (``user_token_dropout``; seeded per pair
        and epoch, so a resumed run drops the same pairs)."""
        p = float(getattr(self.params, "user_token_dropout", 0.0))
        if p <= 0.0:
            return False
        g = torch.Generator().manual_seed(pair_seed(self.seed, epoch, int(index)) ^ DROPOUT_STREAM)
        return bool(torch.rand((), generator=g).item() < p)

    def tokens(self, indices: torch.Tensor, epoch: int, device: torch.device) -> torch.Tensor:
        """User tokens ``[B, N, D]`` (float32, on ``device``) for the pairs of source rows ``indices``; zero for a
        pair without context rows or dropped (``user_token_dropout``)."""
        batch = [
            np.zeros(0, dtype=np.int64) if self.dropped(int(i), epoch) else self.context_rows(int(i), epoch)
            for i in indices.tolist()
        ]
        feats = torch.zeros(len(batch), self.k, self.features.shape[1])
        mask = torch.zeros(len(batch), self.k, dtype=torch.bool)
        for b, rows in enumerate(batch):
            feats[b, : len(rows)] = self.features[torch.from_numpy(rows)]
            mask[b, : len(rows)] = True
        feats, mask = feats.to(device), mask.to(device)
        has = mask.any(1)
        out = torch.zeros(len(batch), self.projector.num_tokens, self.projector.token_dim, device=device)
        if has.any():
            out = out.index_put((has.nonzero().flatten(),), self._projector()(feats[has], mask[has]))
        return out

    def _projector(self):
        # the UNet's own submodule (through a DDP wrapper when there is one): its gradients are the ones averaged
        module = getattr(self.unet, "module", self.unet)
        return getattr(module, "user_projector", self.projector)

    # ---- checkpoints and export ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The user branch and the projector (what a LoRA checkpoint does not hold otherwise)."""
        from ..models import user_attention as ua

        state = {f"attention.{k}": v for k, v in ua.user_attention_state_dict(self._unet()).items()}
        state.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        attention = {k[len("attention.") :]: v for k, v in state.items() if k.startswith("attention.")}
        own = dict(self._unet().named_parameters())
        with torch.no_grad():
            for name, value in attention.items():
                own[name].copy_(value)
        self.projector.load_state_dict({k[len("projector.") :]: v for k, v in state.items()
                                        if k.startswith("projector.")})  # fmt: skip

    def _unet(self):
        return getattr(self.unet, "module", self.unet)

    def encoder(self):
        """The run's :class:`~diffalign.models.user_encoder.UserEncoder` (frozen featuriser + trained projector)."""
        from ..models.user_encoder import UserEncoder

        return UserEncoder(self.projector, self.featurizer)

    def export(self, output_dir: Path, check_finite) -> dict[str, Path]:
        """``<out>/user_attention.safetensors`` and ``<out>/user_encoder/``; non-finite weights are refused."""
        from ..models import user_attention as ua

        output_dir = Path(output_dir)
        check_finite(self.state_dict(), f"export to {output_dir / 'user_attention.safetensors'}")
        attention = ua.save_user_attention(
            self._unet(), output_dir / "user_attention.safetensors",
            metadata={"user_context_pairs": self.k, "user_encoder": self.params.user_encoder},
        )  # fmt: skip
        encoder = self.encoder().save(output_dir / "user_encoder")
        return {"user_attention": attention, "user_encoder": encoder}


def _fit_vocab(projector, featurizer, train_data, features, user_rows, params, acc) -> None:
    """``user_vocab_fit_steps``: fit the phrase-mixture projector to the training users' own labels
    (:func:`~diffalign.models.vocab_projector.fit_vocab_preferences`), then freeze it."""
    import torch.nn.functional as F

    from ..models import user_encoder as ue
    from ..models.vocab_projector import fit_vocab_preferences

    if not hasattr(getattr(featurizer, "clip", None), "text_features"):
        raise ConfigError("user_vocab_fit_steps needs a CLIP pair encoder (user_encoder: a CLIP), not a VLM")
    labels = np.asarray(train_data["label_0"], dtype=np.float64)
    owners = np.asarray(train_data["user_id"], dtype=np.int64)
    keep = np.flatnonzero((np.abs(labels - 0.5) > 1e-6) & np.isin(owners, list(user_rows)))
    order = sorted({int(u) for u in owners[keep]})
    index = {u: i for i, u in enumerate(order)}
    k = params.user_context_pairs
    context, mask = (
        torch.zeros(len(order), k, features.shape[1]),
        torch.zeros(len(order), k, dtype=torch.bool),
    )
    for u, i in index.items():
        rows = user_rows[u][:k]
        context[i, : len(rows)], mask[i, : len(rows)] = features[torch.as_tensor(rows)], True
    sub = train_data.select(keep.tolist())
    table = ue.pair_features_table(featurizer, sub["caption"], sub["jpg_0"], sub["jpg_1"], labels[keep],
                                   progress=acc.is_local_main_process)  # fmt: skip
    with torch.no_grad():
        text = F.normalize(featurizer.clip.text_features(list(params.user_vocab)).float(), dim=-1)
    device = projector.out.weight.device
    stats = fit_vocab_preferences(
        projector, context.to(device), mask.to(device), torch.as_tensor([index[int(u)] for u in owners[keep]]),
        table[:, : featurizer.odd_dims].to(device), text.to(device), params.user_vocab_fit_steps,
    )  # fmt: skip
    acc.print(
        f"user vocab fit: {len(order)} users, {len(keep)} pairs: accuracy {stats['before_accuracy']:.3f} -> "
        f"{stats['after_accuracy']:.3f} (one weight vector for all users: {stats['after_shared_accuracy']:.3f}), "
        f"loss {stats['before_loss']:.4f} -> {stats['after_loss']:.4f}, tau {stats['tau']:.2f}; projector frozen"
    )
    projector.requires_grad_(False)

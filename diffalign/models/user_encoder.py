"""The user encoder of PPD: a frozen encoder reads a user's context pairs, a small projector makes user tokens.

PPD (Dang et al., CVPR 2025, "Personalized Preference Fine-tuning of Diffusion Models") conditions the UNet on a
user through ``N`` user tokens of width ``D`` (the decoupled cross-attention of :mod:`.user_attention`:
``cross_attention_kwargs={"user_tokens": tokens[None]}``, ``D`` its ``user_dim``). The tokens come from ``k``
*context pairs* of that user, ``(caption, preferred image, rejected image)``:

    f_j = featurizer(caption_j, pref_j, rej_j)             frozen, no gradient          [k, F]
    u   = projector(f_1 .. f_k)                            trainable                    [N, D]

Two featurisers (the :class:`PairFeaturizer` protocol):

- :class:`ClipPairFeaturizer`: ``[e(pref) − e(rej), e(pref) + e(rej), t(caption)]``, normalised CLIP embeddings.
  The difference is the taste (what the user chose *over* what), the sum and the caption are the context (what the
  choice was between, for which prompt): the same difference means different things for different subjects.
- :class:`VLMHiddenStateFeaturizer`: as the paper reads LLaVA-OneVision, the mean of a layer's hidden states of a
  vision-language model shown both images and the caption in a prompt that states the choice.

Because the featuriser is frozen, a training run featurises every pair once (:func:`pair_features_table`) and only
the projector runs per step (:meth:`UserEncoder.embed_features` on ``[B, k, F]`` gathered from the table).

On disk: :meth:`UserEncoder.save` writes ``user_encoder.json`` (featuriser kind and model path, ``F``, ``N``, ``D``,
pooling) and ``user_projector.safetensors``; :func:`save_embedding` stores a user's tokens, computed once, with
``user_id``, ``k`` and ``encoder_digest``. Bad files raise a one-line ``ValueError`` naming the file.

Sandbox defaults: the sandbox CLIP's projection width is 64, so ``F = 3 · 64 = 192``; ``D = 32`` is the sandbox
UNet's ``cross_attention_dim`` (``sandbox/assets/pipeline/unet/config.json``; IP-Adapter's choice of ``D`` equal to
the text width) and ``N = 4`` tokens (IP-Adapter's count, a few tokens of a 77-token text).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import ConfigError
from ..rewards.base import to_pil_list
from .pair_featurizers import (  # noqa: F401  (re-exported: the encoder's public API)
    CLIP_KINDS,
    DEFAULT_VLM_PROMPT,
    FEATURIZERS,
    ClipPairFeaturizer,
    PairFeaturizer,
    VLMHiddenStateFeaturizer,
    featurizer_from_config,
    masked_mean,
)

FORMAT = "diffalign-user-encoder-v1"
CONFIG_NAME = "user_encoder.json"
WEIGHTS_NAME = "user_projector.safetensors"
EMBEDDING_FORMAT = "diffalign-user-embedding-v1"
EMBEDDING_KEY = "diffalign_user_embedding"
EMBEDDING_TENSOR = "user_tokens"
EMBEDDING_REQUIRED = ("user_id", "k", "encoder_digest")
POOLS = ("mean", "attention")
SANDBOX_NUM_TOKENS = 4
SANDBOX_TOKEN_DIM = 32  # the sandbox UNet's cross_attention_dim


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a safetensors file, or a one-line :class:`ConfigError` naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{path}: not a readable safetensors file ({_one_line(err)})") from err


# ---------------------------------------------------------------------------------------------------------------
# Projector (trainable)
# ---------------------------------------------------------------------------------------------------------------


class UserProjector(nn.Module):
    """Context features ``[B, k, F]`` (+ optional mask ``[B, k]``, True = real pair) → user tokens ``[B, N, D]``.

    ``h_j = MLP(f_j)`` per pair (Linear F→H, GELU, Linear H→H); ``p = pool_j(h_j)`` over the unmasked pairs, the mean
    or (``pool="attention"``) softmax weights ``∝ exp(q · W h_j / √H)`` with a learned query ``q``; then
    ``Linear(H → N·D)``, reshaped to ``N`` tokens, each through one shared ``LayerNorm(D)`` (IP-Adapter's image
    projection). Both pools treat the pairs as a set: the output does not depend on their order, and a masked pair
    (its features may be anything, even NaN: it is replaced by zeros before the MLP's output is used) changes
    nothing, so users with fewer than ``k`` pairs are padded rows.

    Initialisation is deterministic in ``seed``: every weight and bias ``U(−1/√fan_in, 1/√fan_in)`` (``nn.Linear``'s
    bound) and the query, drawn from a private ``torch.Generator`` (the global RNG is neither used nor moved)."""

    def __init__(
        self,
        feature_dim: int,
        num_tokens: int = SANDBOX_NUM_TOKENS,
        token_dim: int = SANDBOX_TOKEN_DIM,
        hidden: int = 256,
        pool: str = "mean",
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if min(feature_dim, num_tokens, token_dim, hidden) < 1:
            raise ValueError(f"F, N, D, hidden must be >= 1: {(feature_dim, num_tokens, token_dim, hidden)}")
        self.feature_dim, self.num_tokens, self.token_dim = int(feature_dim), int(num_tokens), int(token_dim)
        self.hidden, self.pool = int(hidden), pool
        with torch.random.fork_rng(
            devices=[]
        ):  # nn.Linear's default init draws from the global RNG: restore it
            self.pair_mlp = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
            if pool == "attention":
                self.query = nn.Parameter(torch.empty(hidden))
                self.key = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, self.num_tokens * self.token_dim)
        self.norm = nn.LayerNorm(self.token_dim)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / math.sqrt(module.in_features)
                    for p in (module.weight, module.bias):
                        if p is None:  # a bias-free layer (odd_projector.py)
                            continue
                        p.copy_(torch.rand(p.shape, generator=generator) * (2 * bound) - bound)
            if self.pool == "attention":
                bound = 1.0 / math.sqrt(self.hidden)
                self.query.copy_(torch.rand(self.query.shape, generator=generator) * (2 * bound) - bound)
            self.norm.reset_parameters()

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"features must be [B, k, {self.feature_dim}], got {list(features.shape)}")
        batch, k = features.shape[:2]
        if mask is None:
            mask = torch.ones(batch, k, dtype=torch.bool, device=features.device)
        mask = mask.to(features.device, torch.bool)
        if mask.shape != (batch, k):
            raise ValueError(f"mask must be [B, k] = [{batch}, {k}], got {list(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every row needs at least one unmasked context pair")
        return self.to_tokens(self.pooled(features, mask))

    def pooled(self, features: Tensor, mask: Tensor) -> Tensor:
        """``[B, H]``: the pairs' MLP outputs pooled over the unmasked pairs."""
        param = self.out.weight
        h = self.embed_pairs(torch.where(mask.unsqueeze(-1), features, 0).to(param.dtype))
        h = torch.where(mask.unsqueeze(-1), h, 0)  # a masked pair contributes exactly zero
        if self.pool == "mean":
            pooled = h.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(h.dtype)
        else:
            scores = self.key(h) @ self.query / math.sqrt(self.hidden)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)
            pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return pooled

    # pooled [B, H] -> tokens [B, N, D] (vocab_projector.py overrides it)
    def to_tokens(self, pooled: Tensor) -> Tensor:
        return self.norm(self.out(pooled).view(len(pooled), self.num_tokens, self.token_dim))

    def embed_pairs(self, features: Tensor) -> Tensor:  # per-pair MLP (odd_projector.py overrides it)
        return self.pair_mlp(features)

    def extra_repr(self) -> str:
        return f"F={self.feature_dim}, N={self.num_tokens}, D={self.token_dim}, H={self.hidden}, pool={self.pool}"


# ---------------------------------------------------------------------------------------------------------------
# Encoder: featuriser + projector, files
# ---------------------------------------------------------------------------------------------------------------


def make_projector(*args: Any, odd_dims: int = 0, vocab_size: int = 0, **kwargs: Any) -> UserProjector:
    """:class:`UserProjector`, or with ``odd_dims > 0`` its version odd in the choices (``odd_projector.py``), or
    with ``vocab_size > 0`` the one whose tokens are mixtures of text phrases (``vocab_projector.py``)."""
    if vocab_size:
        from .vocab_projector import VocabUserProjector

        return VocabUserProjector(*args, vocab_size=vocab_size, odd_dims=odd_dims, **kwargs)
    if odd_dims:
        from .odd_projector import OddUserProjector

        return OddUserProjector(*args, odd_dims=odd_dims, **kwargs)
    return UserProjector(*args, **kwargs)


def _identity(featurizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """A featuriser's kind and options without its model path: what must match between save and load."""
    return {k: v for k, v in featurizer_config.items() if k != "model_path"}


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, (bytes, bytearray, memoryview)):
        from ..data.pair_images import decode_rgb

        return decode_rgb(image)
    return to_pil_list(image)[0]


class UserEncoder:
    """A frozen :class:`PairFeaturizer` plus a trainable :class:`UserProjector`.

    Not an ``nn.Module`` on purpose: an optimiser over ``encoder.projector.parameters()`` is the whole trainable
    part, and the frozen featuriser never enters a state dict. ``featurizer`` may be ``None`` when only precomputed
    features are used (:meth:`embed_features`); ``featurizer_config`` then keeps what :meth:`save` records."""

    def __init__(
        self,
        projector: UserProjector,
        featurizer: PairFeaturizer | None = None,
        featurizer_config: Mapping[str, Any] | None = None,
    ) -> None:
        if featurizer is not None and featurizer.dim != projector.feature_dim:
            raise ValueError(f"featurizer dim {featurizer.dim} != projector's F {projector.feature_dim}")
        self.projector = projector
        self.featurizer = featurizer
        described = featurizer.describe() if featurizer is not None else featurizer_config
        self.featurizer_config = dict(described or {})

    @classmethod
    def build(
        cls,
        featurizer: PairFeaturizer | None = None,
        num_tokens: int = SANDBOX_NUM_TOKENS,
        token_dim: int = SANDBOX_TOKEN_DIM,
        hidden: int = 256,
        pool: str = "mean",
        *,
        seed: int = 0,
    ) -> UserEncoder:
        """A fresh encoder; ``featurizer=None`` loads the sandbox CLIP one (``F = 192``)."""
        featurizer = ClipPairFeaturizer() if featurizer is None else featurizer
        odd = getattr(featurizer, "odd_dims", 0)
        return cls(
            make_projector(featurizer.dim, num_tokens, token_dim, hidden, pool, odd_dims=odd, seed=seed),
            featurizer,
        )

    # -- embedding ---------------------------------------------------------------------------------------------
    def embed_features(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Precomputed context features ``[B, k, F]`` (mask ``[B, k]``) → user tokens ``[B, N, D]``."""
        return self.projector(features.to(self.projector.out.weight.device), mask)

    def embed(self, context_pairs: Sequence[tuple[str, Any, Any]]) -> Tensor:
        """One user's ``k`` pairs ``(caption, preferred, rejected)`` (images: PIL, uint8 ``[H, W, 3]`` or encoded
        bytes) → tokens ``[N, D]`` (give the UNet ``tokens[None]``). Gradients reach the projector only."""
        if self.featurizer is None:
            raise ValueError("this encoder has no featurizer (load_featurizer=False): use embed_features")
        if not context_pairs:
            raise ValueError("embed needs at least one context pair")
        caps, pref, rej = zip(*[(str(c), _to_pil(p), _to_pil(r)) for c, p, r in context_pairs])
        features = self.featurizer.features(list(caps), list(pref), list(rej))
        return self.embed_features(features.unsqueeze(0))[0]

    @staticmethod
    def interpolate(tokens_a: Tensor, tokens_b: Tensor, alpha: float | Tensor) -> Tensor:
        """The module's :func:`interpolate`."""
        return interpolate(tokens_a, tokens_b, alpha)

    # -- files -------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What ``user_encoder.json`` records (the digest aside)."""
        p, keys = self.projector, ("feature_dim", "num_tokens", "token_dim", "hidden", "pool", "odd_dims")
        out = {"format": FORMAT, "featurizer": self.featurizer_config, **{k: getattr(p, k, 0) for k in keys}}
        if getattr(p, "vocab_size", 0):  # only then: older encoders' configs and digests stay as they were
            out.update(vocab_size=p.vocab_size, vocab_phrases=list(p.phrases))
        return out

    def digest(self) -> str:
        """16 hex digits of SHA-256 over the config and the projector weights: names the encoder an embedding came
        from, so a stale saved embedding is caught on load. The featuriser's model path is left out (paths move
        between machines); its kind and options (layer, prompt) are in."""
        config = {**self.config(), "featurizer": _identity(self.featurizer_config)}
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, value in sorted(self.projector.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/user_encoder.json`` and ``path/user_projector.safetensors``; return the folder."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
        (folder / CONFIG_NAME).write_text(
            json.dumps({**self.config(), "digest": self.digest()}, indent=2) + "\n"
        )
        return folder

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        featurizer: PairFeaturizer | None = None,
        *,
        load_featurizer: bool = True,
        device: torch.device | str = "cpu",
    ) -> UserEncoder:
        """Read a folder written by :meth:`save`. ``featurizer``: use this one (its kind, options and ``dim`` must
        match the config; its model path may differ, as paths move between machines); else it is rebuilt from the config, or
        left out with ``load_featurizer=False``. Both files are checked before any model loads."""
        cfg_path, weights_path = Path(path) / CONFIG_NAME, Path(path) / WEIGHTS_NAME
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: user encoder config not found (write one with UserEncoder.save)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{cfg_path}: not a readable JSON config ({_one_line(err)})") from err
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise ConfigError(f"{cfg_path}: format {found!r} is not {FORMAT!r}")
        for key in ("feature_dim", "num_tokens", "token_dim", "hidden"):
            if not isinstance(cfg.get(key), int) or isinstance(cfg[key], bool) or cfg[key] < 1:
                raise ConfigError(f"{cfg_path}: {key} must be a positive integer, got {cfg.get(key)!r}")
        if cfg.get("pool") not in POOLS:
            raise ConfigError(f"{cfg_path}: pool {cfg.get('pool')!r} is not one of {POOLS}")
        fz_cfg = cfg.get("featurizer")
        if not isinstance(fz_cfg, dict) or fz_cfg.get("kind") not in FEATURIZERS:
            raise ConfigError(f"{cfg_path}: featurizer {fz_cfg!r} needs a kind, one of {sorted(FEATURIZERS)}")
        trained = (_identity(fz_cfg), cfg["feature_dim"])
        if (
            featurizer is not None
            and (given := (_identity(featurizer.describe()), featurizer.dim)) != trained
        ):
            raise ConfigError(
                f"{cfg_path}: the featurizer (options, F) {given} is not the encoder's {trained}"
            )
        vocab_size = cfg.get("vocab_size", 0)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 0:
            raise ConfigError(f"{cfg_path}: vocab_size must be a non-negative integer, got {vocab_size!r}")
        projector = make_projector(*(cfg[k] for k in ("feature_dim", "num_tokens", "token_dim", "hidden", "pool")),
                                   odd_dims=cfg.get("odd_dims", 0), vocab_size=vocab_size)  # fmt: skip
        if vocab_size:
            projector.phrases = [str(p) for p in cfg.get("vocab_phrases", [])]
        _, state = _read_safetensors(weights_path, "projector weights (write them with UserEncoder.save)")
        expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(f"{weights_path}: keys missing {missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                found = tuple(state[key].shape)
                raise ConfigError(f"{weights_path}: shape mismatch for {key}: {found}, config: {shape}")
        projector.load_state_dict(state)
        projector.to(device)
        if featurizer is None and load_featurizer:
            featurizer = featurizer_from_config(fz_cfg, device=device)
            if featurizer.dim != cfg["feature_dim"]:
                raise ConfigError(
                    f"{cfg_path}: the featurizer at {fz_cfg.get('model_path')} gives {featurizer.dim} features, the "
                    f"projector expects {cfg['feature_dim']}"
                )
        return cls(projector, featurizer, fz_cfg)

    def save_embedding(self, path: str | os.PathLike, tokens: Tensor, metadata: Mapping[str, Any]) -> Path:
        """:func:`save_embedding` with ``encoder_digest`` set to this encoder's :meth:`digest`."""
        return save_embedding(path, tokens, {**metadata, "encoder_digest": self.digest()})

    def load_embedding(self, path: str | os.PathLike) -> tuple[Tensor, dict[str, Any]]:
        """:func:`load_embedding` that refuses an embedding made by another encoder (or other weights)."""
        return load_embedding(path, expect_digest=self.digest())


# ---------------------------------------------------------------------------------------------------------------
# Saved embeddings, interpolation
# ---------------------------------------------------------------------------------------------------------------


def save_embedding(path: str | os.PathLike, tokens: Tensor, metadata: Mapping[str, Any]) -> Path:
    """Write user tokens (``[N, D]``, or ``[B, N, D]``) to a safetensors file, computed once and reused.

    ``metadata`` must hold ``user_id``, ``k`` (context pairs used) and ``encoder_digest``
    (:meth:`UserEncoder.digest`); any other JSON-serialisable entries are kept. They are stored as one JSON entry
    ``"diffalign_user_embedding"`` of the file's metadata, with ``format`` and the token ``shape``."""
    from safetensors.torch import save_file

    missing = [k for k in EMBEDDING_REQUIRED if k not in metadata]
    if missing:
        raise ValueError(f"embedding metadata needs {list(EMBEDDING_REQUIRED)}; missing {missing}")
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must be [N, D] or [B, N, D], got {list(tokens.shape)}")
    header = {**metadata, "format": EMBEDDING_FORMAT, "shape": list(tokens.shape)}
    try:
        text = json.dumps(header, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"embedding metadata must be JSON-serialisable: {_one_line(err)}") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = tokens.detach().to("cpu", torch.float32).contiguous()
    save_file({EMBEDDING_TENSOR: tensor}, str(path), metadata={EMBEDDING_KEY: text})
    return path


def load_embedding(path: str | os.PathLike, expect_digest: str | None = None) -> tuple[Tensor, dict]:
    """Read :func:`save_embedding`'s file → ``(tokens float32, metadata)``; ``expect_digest`` refuses an embedding
    of another encoder. One-line ``ValueError`` naming the file on a missing, foreign or stale file."""
    path = Path(path)
    meta, tensors = _read_safetensors(path, "user embedding")
    tokens = tensors.get(EMBEDDING_TENSOR)
    try:
        header = json.loads(meta.get(EMBEDDING_KEY, "null"))
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != EMBEDDING_FORMAT or tokens is None:
        raise ConfigError(f"{path}: not a {EMBEDDING_FORMAT} file (no {EMBEDDING_KEY!r} metadata or tensor)")
    if expect_digest is not None and header.get("encoder_digest") != expect_digest:
        found = header.get("encoder_digest")
        raise ConfigError(f"{path}: made by encoder {found!r}, not {expect_digest!r}: recompute it")
    header.pop("format")
    return tokens, header


def interpolate(tokens_a: Tensor, tokens_b: Tensor, alpha: float | Tensor) -> Tensor:
    """``(1 − α) · a + α · b``, token by token: α = 0 gives user a, α = 1 user b, exactly (PPD blends users this
    way). It is linear in token space and is *not* re-normalised: midway tokens of two different users have a smaller
    norm than the LayerNorm'd endpoints. α outside [0, 1] extrapolates, off what the UNet was trained on."""
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(f"cannot interpolate shapes {list(tokens_a.shape)} and {list(tokens_b.shape)}")
    # torch.lerp computes a + α(b − a) for α < 0.5 and b − (1 − α)(b − a) above: both endpoints are exact
    return torch.lerp(tokens_a, tokens_b, alpha if isinstance(alpha, Tensor) else float(alpha))


# ---------------------------------------------------------------------------------------------------------------
# Precomputation
# ---------------------------------------------------------------------------------------------------------------


def pair_features_table(
    featurizer: PairFeaturizer,
    captions: Sequence[str],
    jpg0_bytes: Sequence[bytes],
    jpg1_bytes: Sequence[bytes],
    label0: Sequence[float] | np.ndarray | Tensor,
    batch_size: int = 256,
    *,
    progress: bool = False,
) -> Tensor:
    """Feature rows ``[P, F]`` (float32, CPU) of Pick-a-Pic-schema pairs, preferred image first.

    ``label_0 ≥ 0.5`` → image 0 is the preferred one, else image 1. A tie (0.5) therefore reads image 0 as
    preferred: its difference block has an arbitrary sign, so drop ties from the context pairs (the data's tie
    policy) rather than rely on this. The featuriser is frozen, so a run computes this table once and only the
    projector runs per step. Images are decoded with the data pipeline's ``decode_rgb`` (alpha over white)."""
    from ..data.pair_images import decode_rgb

    labels = np.asarray(label0.cpu() if isinstance(label0, Tensor) else label0, dtype=np.float64).reshape(-1)
    n, sizes = len(captions), (len(captions), len(jpg0_bytes), len(jpg1_bytes), len(labels))
    if len(set(sizes)) != 1:
        raise ValueError(f"captions, jpg_0, jpg_1, label_0 have different lengths {sizes}")
    if np.isnan(labels).any():
        raise ValueError(f"label_0 has NaN at rows {np.flatnonzero(np.isnan(labels))[:5].tolist()}")
    if n == 0:
        return torch.zeros(0, featurizer.dim)
    starts = range(0, n, int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="pair features", unit="batch")
    rows = []
    for start in starts:
        stop = min(n, start + int(batch_size))
        pref, rej = [], []
        for i in range(start, stop):
            im0, im1 = decode_rgb(jpg0_bytes[i]), decode_rgb(jpg1_bytes[i])
            first = labels[i] >= 0.5
            pref.append(im0 if first else im1)
            rej.append(im1 if first else im0)
        rows.append(featurizer.features(list(captions[start:stop]), pref, rej).float().cpu())
    return torch.cat(rows)

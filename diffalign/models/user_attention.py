"""Decoupled cross-attention for user embeddings (IP-Adapter style), as PPD conditions the UNet on a user.

PPD (Dang et al., CVPR 2025, "Personalized Preference Fine-tuning of Diffusion Models") feeds a user embedding, a
sequence of ``N`` user tokens of width ``D``, to every cross-attention layer of the UNet through an *additional*
attention: the layer's query attends to the text tokens as usual and, separately, to the user tokens through a
second, trainable key/value projection (``to_k_user``, ``to_v_user``); the two attention outputs are added, the user
part times a scale, before the layer's output projection::

    out = to_out(attn(q, k_text, v_text) + user_scale * attn(q, to_k_user(u), to_v_user(u)))

Self-attention layers (``attn1``) are untouched. Without user tokens, or with scale 0, the UNet is exactly the base
UNet (same code path as diffusers' ``AttnProcessor2_0``: ``F.scaled_dot_product_attention``, group / spatial norm,
residual, rescale), bit for bit. ``to_v_user`` starts at zero, so a freshly added branch changes nothing and
training starts at the base model; ``to_k_user`` starts from a seeded ``U(-1/sqrt(D), 1/sqrt(D))`` (the bound of
``nn.Linear``'s default init) drawn from its own ``torch.Generator`` seeded with ``seed + layer index`` (layers in
``unet.attn_processors`` order), so the init does not depend on, or disturb, the global RNG. A nonzero key makes
the user tokens distinguishable from the first step; its gradient is zero until ``to_v_user`` moves off zero.

Usage with a stock pipeline (diffusers forwards ``cross_attention_kwargs`` to the processors)::

    pipe = StableDiffusionPipeline.from_pretrained(...)
    load_user_attention(pipe, "user_attention.safetensors")  # or add_user_attention(pipe.unet, user_dim) to train
    image = pipe(prompt, cross_attention_kwargs={"user_tokens": u, "user_scale": 1.0}).images[0]  # u: [B, N, D]

To train the branch alone, freeze the UNet (or call ``add_lora``, which freezes it) *before* :func:`add_user_attention`
(a later ``unet.requires_grad_(False)`` freezes the branch too). Anything that sets processors afterwards
(``unet.set_attn_processor``, ``set_default_attn_processor``, ``pipe.enable_xformers_memory_efficient_attention``)
removes the branch. The branch weights take the dtype of the UNet; they may be cast to float32 for training under a
half-precision UNet: the processor computes the user keys/values in their dtype and adds the result in the UNet's.

How the kwargs arrive (verified with diffusers 0.42): the UNet passes ``cross_attention_kwargs`` down to every
``Attention.forward``, which keeps only the keys that its processor's ``__call__`` declares and logs a warning for
the others. So both processors installed here declare ``user_tokens`` and ``user_scale`` (on an ``nn.Module``
processor ``__call__`` itself is defined, as diffusers' IP-Adapter processors do: ``Module.__call__``'s signature
is ``*args, **kwargs`` and the kwargs would be dropped), and the self-attention layers get
:class:`PlainAttnProcessor`, the stock computation that accepts and ignores them. ``"scale"`` is not used as a key:
diffusers reserves it for LoRA scaling.

Batch rule: user tokens of batch ``Bu`` serve a UNet batch ``B`` that is a multiple of ``Bu``; row ``i`` of the
UNet batch gets user row ``i % Bu`` (the tokens are tiled, as ``torch.cat`` stacks batches). This fits the ways
batches get doubled: classifier-free guidance (``cat([uncond, cond])``: the unconditional half ALSO gets the user
tokens, as IP-Adapter gives both halves the image embeds, so guidance amplifies the text while the user condition
enters both halves at ``user_scale``) and a Diffusion-DPO pair step (``cat([winners, losers])``). ``Bu == 1``
serves any batch. With several prompts *and* ``num_images_per_prompt > 1`` the pipeline repeats each prompt in
place (``[p0, p0, p1, p1]``): give one user row per image in that order. For "user guidance" instead, pass ``2B``
rows with zeros in the unconditional half: zero tokens give an exactly zero user branch (no bias in the
projections).

On disk (:func:`save_user_attention`): one safetensors file holding, for every cross-attention layer,
``<processor name>.to_k_user.weight`` and ``<processor name>.to_v_user.weight`` (``[inner_dim, user_dim]``, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_user.weight``: the same names as in
``unet.state_dict()`` once installed), and one metadata entry ``"diffalign_user_attention"``: JSON with ``format``
(``"diffalign-user-attention-v1"``), ``user_dim``, ``num_layers``, ``scale`` and the caller's ``metadata``.
:func:`load_user_attention` installs the processors on a stock diffusers UNet and loads the weights, checking the
format, the key set and the shapes before it changes the UNet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import ConfigError

FORMAT = "diffalign-user-attention-v1"
METADATA_KEY = "diffalign_user_attention"
WEIGHT_NAMES = ("to_k_user", "to_v_user")


def _attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    user: UserAttnProcessor | None = None,
    user_tokens: torch.Tensor | None = None,
    user_scale: float = 0.0,
) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` computation, op for op (so the base output is bit-identical), plus the user
    branch when ``user`` and ``user_tokens`` are given and ``user_scale != 0``."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        # (batch, heads, query length, key length), as scaled_dot_product_attention expects
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    # a self-attention call (no encoder states) never takes the user branch
    with_user = user is not None and user_tokens is not None and encoder_hidden_states is not None
    with_user = with_user and user_scale != 0

    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)

    if with_user:
        assert user is not None and user_tokens is not None
        tokens = user.tokens_for_batch(user_tokens, batch_size)
        weight_dtype = user.to_k_user.weight.dtype
        # the branch's weights may be float32 (trainable) under a half-precision UNet: compute in theirs, add in ours
        user_key = user.to_k_user(tokens.to(weight_dtype)).to(query.dtype)
        user_value = user.to_v_user(tokens.to(weight_dtype)).to(query.dtype)
        user_key = user_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        user_value = user_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            user_key = attn.norm_k(user_key)
        # no mask: the text attention mask covers the text tokens only
        user_states = F.scaled_dot_product_attention(
            query, user_key, user_value, dropout_p=0.0, is_causal=False
        )
        user_states = user_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states + user_scale * user_states.to(query.dtype)

    hidden_states = attn.to_out[0](hidden_states)  # linear projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout

    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class PlainAttnProcessor:
    """The stock ``AttnProcessor2_0`` computation for the layers without a user branch (self-attention). It
    declares ``user_tokens`` / ``user_scale`` only so that diffusers passes them without warning; it ignores them."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | None = None,
    ) -> torch.Tensor:
        return _attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class UserAttnProcessor(nn.Module):
    """Cross-attention processor with the decoupled user branch (see the module docstring).

    ``inner_dim`` is the width of the layer's keys (``attn.inner_kv_dim``); ``user_dim`` the width ``D`` of a user
    token. ``scale`` is the default ``user_scale``; a ``user_scale`` in ``cross_attention_kwargs`` overrides it for
    that call. ``seed`` seeds ``to_k_user``'s init (``None``: leave ``nn.Linear``'s default, global-RNG init)."""

    def __init__(self, inner_dim: int, user_dim: int, scale: float = 1.0, seed: int | None = 0):
        super().__init__()
        self.inner_dim = int(inner_dim)
        self.user_dim = int(user_dim)
        self.scale = float(scale)
        self.to_k_user = nn.Linear(self.user_dim, self.inner_dim, bias=False)
        self.to_v_user = nn.Linear(self.user_dim, self.inner_dim, bias=False)
        with torch.no_grad():
            nn.init.zeros_(
                self.to_v_user.weight
            )  # the fresh branch adds exactly zero: training starts at the base
            if seed is not None:
                bound = 1.0 / math.sqrt(self.user_dim)
                generator = torch.Generator().manual_seed(int(seed))
                init = torch.rand(self.to_k_user.weight.shape, generator=generator) * (2 * bound) - bound
                self.to_k_user.weight.copy_(init)

    def tokens_for_batch(self, user_tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        """User tokens ``[Bu, N, D]`` (or ``[Bu, D]``: one token) tiled to the UNet batch: row ``i`` gets user row
        ``i % Bu`` (classifier-free guidance and pair steps concatenate batches)."""
        if user_tokens.dim() == 2:
            user_tokens = user_tokens.unsqueeze(1)
        if user_tokens.dim() != 3 or user_tokens.shape[-1] != self.user_dim:
            raise ConfigError(
                f"user_tokens must be [batch, tokens, {self.user_dim}], got {list(user_tokens.shape)}"
            )
        rows = user_tokens.shape[0]
        if rows == batch_size:
            return user_tokens
        if rows == 0 or batch_size % rows != 0:
            raise ConfigError(
                f"user_tokens have batch {rows}, which does not divide the UNet batch {batch_size}: give 1, "
                f"{batch_size} or a divisor of it (row i of the UNet batch gets user row i % {max(rows, 1)})"
            )
        return user_tokens.repeat(batch_size // rows, 1, 1)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | None = None,
    ) -> torch.Tensor:
        # __call__ rather than forward: diffusers reads the accepted cross_attention_kwargs from its signature
        scale = self.scale if user_scale is None else float(user_scale)
        return _attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, self, user_tokens, scale
        )

    def extra_repr(self) -> str:
        return f"inner_dim={self.inner_dim}, user_dim={self.user_dim}, scale={self.scale}"


def _unet(unet_or_pipeline: Any) -> nn.Module:
    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    return getattr(unet, "_orig_mod", unet)  # torch.compile wrapper


def _attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """``{processor name: attention layer}``, in the order of ``unet.attn_processors`` (the layers that
    ``unet.set_attn_processor`` sets)."""
    return {name: unet.get_submodule(name.removesuffix(".processor")) for name in unet.attn_processors}


def _cross_attention_names(unet: nn.Module) -> list[str]:
    return [n for n in _attention_layers(unet) if n.endswith("attn2.processor")]


def _inner_dim(attn: Attention) -> int:
    return int(getattr(attn, "inner_kv_dim", attn.inner_dim))


BRANCH_INITS = ("zero", "text")


def add_user_attention(
    unet: nn.Module, user_dim: int, scale: float = 1.0, *, seed: int = 0, init: str = "zero"
) -> dict[str, UserAttnProcessor]:
    """Install a :class:`UserAttnProcessor` on every cross-attention layer (processor names ending in
    ``attn2.processor``) and a :class:`PlainAttnProcessor` on every other attention layer; return the user
    processors by name. Replaces whatever processors (and user branches) were there.

    ``init``: ``"zero"`` (the module docstring: ``to_v_user`` 0, a seeded ``to_k_user``; the branch starts as a
    no-op) or ``"text"`` (IP-Adapter's: ``to_k_user`` and ``to_v_user`` copied from the layer's text ``to_k`` and
    ``to_v``, their base weights under a LoRA; needs ``user_dim`` equal to the text width), which makes the branch
    act, and every branch weight get gradient, from the first step.

    The processors become submodules of their ``Attention`` layers, so ``unet.parameters()`` includes the new
    weights; they are trainable (``requires_grad=True``), on the device and in the dtype of the layer's ``to_q``,
    and nothing else's ``requires_grad`` changes (freeze the UNet first to train the branch alone)."""
    unet = _unet(unet)
    if init not in BRANCH_INITS:
        raise ConfigError(f"user branch init must be one of {list(BRANCH_INITS)}, got {init!r}")
    layers = _attention_layers(unet)
    names = [n for n in layers if n.endswith("attn2.processor")]
    if not names:
        raise ConfigError("this UNet has no cross-attention layers (no processor named '...attn2.processor')")
    processors: dict[str, Any] = {}
    user: dict[str, UserAttnProcessor] = {}
    for index, (name, attn) in enumerate(layers.items()):
        if name in names:
            proc = UserAttnProcessor(_inner_dim(attn), user_dim, scale, seed=seed + index)
            weight = attn.to_q.weight
            proc.to(device=weight.device, dtype=weight.dtype)
            if init == "text":
                _copy_text_projections(proc, attn, name)
            proc.requires_grad_(True)
            user[name] = processors[name] = proc
        else:
            processors[name] = PlainAttnProcessor()
    unet.set_attn_processor(processors)
    return user


def _copy_text_projections(proc: UserAttnProcessor, attn: Attention, name: str) -> None:
    for mine, theirs in ((proc.to_k_user, attn.to_k), (proc.to_v_user, attn.to_v)):
        source = getattr(theirs, "base_layer", theirs).weight  # under a LoRA: the base projection
        if tuple(source.shape) != tuple(mine.weight.shape):
            raise ConfigError(
                f"user branch init 'text': {name} projects text of width {source.shape[1]} but user tokens have "
                f"width {mine.weight.shape[1]}; use init 'zero' or user tokens as wide as the text"
            )
        with torch.no_grad():
            mine.weight.copy_(source)


def user_processors(unet_or_pipeline: Any) -> dict[str, UserAttnProcessor]:
    """The installed :class:`UserAttnProcessor` s by processor name (empty if none)."""
    unet = _unet(unet_or_pipeline)
    return {
        n: a.processor
        for n, a in _attention_layers(unet).items()
        if isinstance(a.processor, UserAttnProcessor)
    }


def _require_user_processors(unet_or_pipeline: Any) -> dict[str, UserAttnProcessor]:
    procs = user_processors(unet_or_pipeline)
    if not procs:
        raise ConfigError(
            "no user attention is installed on this UNet: call add_user_attention or load_user_attention"
        )
    return procs


def set_user_scale(unet_or_pipeline: Any, scale: float) -> None:
    """Set the default ``user_scale`` of every user branch (a ``user_scale`` in ``cross_attention_kwargs`` still
    overrides it per call)."""
    for proc in _require_user_processors(unet_or_pipeline).values():
        proc.scale = float(scale)


def user_attention_state_dict(unet_or_pipeline: Any) -> dict[str, torch.Tensor]:
    """``{"<processor name>.to_k_user.weight": tensor, "<processor name>.to_v_user.weight": tensor, ...}``
    (detached, on their device)."""
    state = {}
    for name, proc in _require_user_processors(unet_or_pipeline).items():
        for w in WEIGHT_NAMES:
            state[f"{name}.{w}.weight"] = getattr(proc, w).weight.detach()
    return state


def save_user_attention(unet_or_pipeline: Any, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the user branches to ``path`` (safetensors, the format in the module docstring). ``metadata`` (JSON
    values: e.g. how the user embedding was made) is stored beside ``format``, ``user_dim`` and ``num_layers``."""
    from safetensors.torch import save_file

    procs = _require_user_processors(unet_or_pipeline)
    dims = {p.user_dim for p in procs.values()}
    if len(dims) != 1:
        raise ConfigError(f"cannot save {path}: the user branches have different user_dim {sorted(dims)}")
    scales = {p.scale for p in procs.values()}
    header = {
        "format": FORMAT,
        "user_dim": dims.pop(),
        "num_layers": len(procs),
        "scale": scales.pop() if len(scales) == 1 else None,
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise ConfigError(f"metadata for {path} must hold JSON values: {e}") from None
    state = {k: v.to("cpu").contiguous() for k, v in user_attention_state_dict(unet_or_pipeline).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={METADATA_KEY: text})
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"{path}: no such user-attention file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not a readable safetensors file ({reason})") from None
    if raw is None:
        raise ConfigError(f"{path}: not a diffalign user-attention file (no '{METADATA_KEY}' metadata entry)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: the '{METADATA_KEY}' metadata entry is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ConfigError(f"{path}: format {found!r} is not {FORMAT!r}")
    if not isinstance(header.get("user_dim"), int) or header["user_dim"] <= 0:
        raise ConfigError(f"{path}: metadata user_dim {header.get('user_dim')!r} is not a positive integer")
    return header, tensors


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_user_attention(unet_or_pipeline: Any, path: str | Path) -> dict[str, Any]:
    """Install user branches on a stock diffusers UNet (or ``pipe.unet``) and load their weights from ``path``;
    return the file's metadata (``format``, ``user_dim``, ``num_layers``, ``scale``, ``metadata``).

    Everything is checked before the UNet changes; a wrong format, missing or unexpected keys, or a shape mismatch
    raise a one-line ``ValueError`` (:class:`~diffalign.errors.ConfigError`) naming the file."""
    path = Path(path)
    header, tensors = _read(path)
    unet = _unet(unet_or_pipeline)
    user_dim = header["user_dim"]
    layers = _attention_layers(unet)
    expected = {
        f"{name}.{w}.weight": (_inner_dim(layers[name]), user_dim)
        for name in _cross_attention_names(unet)
        for w in WEIGHT_NAMES
    }
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} keys this UNet needs are missing: {_few(missing)}")
    if unexpected:
        raise ConfigError(
            f"{path}: {len(unexpected)} keys match no cross-attention layer: {_few(unexpected)}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ConfigError(
                f"{path}: shape mismatch for {key}: file {tuple(tensors[key].shape)}, UNet expects {shape} "
                f"(user_dim {user_dim})"
            )
    scale = header.get("scale")
    procs = add_user_attention(unet, user_dim, 1.0 if scale is None else float(scale))
    with torch.no_grad():
        for name, proc in procs.items():
            for w in WEIGHT_NAMES:
                getattr(proc, w).weight.copy_(tensors[f"{name}.{w}.weight"])
    return header

"""Decoupled user cross-attention (diffalign.models.user_attention) on tiny random SD1.x- and SDXL-shaped UNets.

The base path must stay bit-identical to diffusers' stock ``AttnProcessor2_0``; the user branch is checked against a
float64 hand computation of the attention formula; save/load round-trips into a fresh stock UNet; and a stock
``StableDiffusionPipeline`` with classifier-free guidance carries the user tokens through ``cross_attention_kwargs``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_sd, tiny_sdxl_unet

from diffalign.models.user_attention import (
    FORMAT,
    METADATA_KEY,
    PlainAttnProcessor,
    UserAttnProcessor,
    add_user_attention,
    load_user_attention,
    save_user_attention,
    set_user_scale,
    user_attention_state_dict,
)

USER_DIM = 6


def sd_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    return tiny_sdxl_unet(seed).eval()


BUILDERS = {"sd": sd_unet, "sdxl": sdxl_unet}


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    inp = {
        "sample": torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype),
        "timestep": torch.tensor([10, 500, 900, 250][:batch]),
        "encoder_hidden_states": torch.randn(
            batch, 5, unet.config.cross_attention_dim, generator=g, dtype=dtype
        ),
    }
    if unet.config.addition_embed_type == "text_time":
        inp["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 8, generator=g, dtype=dtype),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch, dtype=dtype),
        }
    return inp


def user_tokens(batch: int = 2, tokens: int = 3, seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, tokens, USER_DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(unet: UNet2DConditionModel, inp: dict, **cross_attention_kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inp, cross_attention_kwargs=cross_attention_kwargs or None).sample


def randomize_values(procs: dict[str, UserAttnProcessor], seed: int = 3, std: float = 0.5) -> None:
    """A trained-looking user branch: ``to_v_user`` off zero (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proc in procs.values():
            w = proc.to_v_user.weight
            w.copy_((torch.randn(w.shape, generator=g) * std).to(w.dtype))


@pytest.fixture
def diffusers_warnings():
    """Warnings diffusers logs (e.g. 'cross_attention_kwargs [...] are not expected by ...') or raises."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    logger.removeHandler(handler)
    records.extend(str(w.message) for w in caught if "user" in str(w.message))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fresh_branch_equals_stock_unet_exactly(kind, diffusers_warnings):
    stock = BUILDERS[kind]()
    assert all(isinstance(p, AttnProcessor2_0) for p in stock.attn_processors.values())
    unet = copy.deepcopy(stock)
    procs = add_user_attention(unet, USER_DIM)

    names = list(unet.attn_processors)
    assert sorted(procs) == sorted(n for n in names if n.endswith("attn2.processor")) and procs
    for name, proc in unet.attn_processors.items():
        assert isinstance(proc, UserAttnProcessor if name.endswith("attn2.processor") else PlainAttnProcessor)
    for proc in procs.values():
        assert torch.count_nonzero(proc.to_v_user.weight) == 0
        assert torch.count_nonzero(proc.to_k_user.weight) == proc.to_k_user.weight.numel()

    inp = unet_inputs(stock)
    base = run(stock, inp)
    assert torch.equal(run(unet, inp), base)
    assert torch.equal(run(unet, inp, user_tokens=user_tokens()), base)
    assert torch.equal(run(unet, inp, user_tokens=user_tokens(batch=1), user_scale=2.0), base)
    assert diffusers_warnings == []  # the kwargs reach the processors: nothing 'not expected ... ignored'


def test_to_k_user_init_is_seeded_and_independent_of_the_global_rng():
    a, b = sd_unet(), sd_unet()
    torch.manual_seed(123)
    pa = add_user_attention(a, USER_DIM)
    torch.manual_seed(456)
    pb = add_user_attention(b, USER_DIM)
    for name in pa:
        assert torch.equal(pa[name].to_k_user.weight, pb[name].to_k_user.weight)
        bound = 1 / math.sqrt(USER_DIM)
        assert pa[name].to_k_user.weight.abs().max() <= bound
    firsts = {tuple(p.to_k_user.weight.flatten()[:4].tolist()) for p in pa.values()}
    assert len(firsts) == len(pa)  # one seed per layer
    pc = add_user_attention(sd_unet(), USER_DIM, seed=7)
    assert not torch.equal(next(iter(pc.values())).to_k_user.weight, next(iter(pa.values())).to_k_user.weight)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_trained_branch_changes_output_and_scale_zero_or_no_tokens_is_base(kind, diffusers_warnings):
    stock = BUILDERS[kind]()
    unet = copy.deepcopy(stock)
    procs = add_user_attention(unet, USER_DIM)
    randomize_values(procs)
    inp = unet_inputs(stock)
    u = user_tokens()
    base = run(stock, inp)

    with_user = run(unet, inp, user_tokens=u)
    assert (with_user - base).abs().max() > 1e-3
    assert not torch.equal(run(unet, inp, user_tokens=user_tokens(seed=9)), with_user)
    assert torch.equal(run(unet, inp), base)
    assert torch.equal(run(unet, inp, user_tokens=None, user_scale=1.0), base)
    assert torch.equal(run(unet, inp, user_tokens=u, user_scale=0.0), base)
    assert torch.equal(
        run(unet, inp, user_tokens=torch.zeros_like(u)), base
    )  # zero tokens: an exactly zero branch

    half = run(unet, inp, user_tokens=u, user_scale=0.5)
    assert not torch.equal(half, base) and not torch.equal(half, with_user)
    set_user_scale(unet, 0.5)  # the default scale; a per-call user_scale overrides it
    assert torch.equal(run(unet, inp, user_tokens=u), half)
    assert torch.equal(run(unet, inp, user_tokens=u, user_scale=1.0), with_user)
    set_user_scale(unet, 0.0)
    assert torch.equal(run(unet, inp, user_tokens=u), base)
    assert diffusers_warnings == []


def test_output_is_linear_in_small_scales_float64():
    unet = sd_unet().double()
    procs = add_user_attention(unet, USER_DIM)
    randomize_values(procs)
    inp = unet_inputs(unet, dtype=torch.float64)
    u = user_tokens(dtype=torch.float64)
    base = run(unet, inp)
    d1 = run(unet, inp, user_tokens=u, user_scale=1e-3) - base
    d2 = run(unet, inp, user_tokens=u, user_scale=2e-3) - base
    dm = run(unet, inp, user_tokens=u, user_scale=-1e-3) - base
    assert d1.abs().max() > 0
    torch.testing.assert_close(d2, 2 * d1, rtol=0, atol=2e-3 * d1.abs().max().item())
    torch.testing.assert_close(dm, -d1, rtol=0, atol=2e-3 * d1.abs().max().item())


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out (no scaled_dot_product_attention)."""
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _layer(unet: UNet2DConditionModel, name: str) -> Attention:
    return dict(unet.named_modules())[name.removesuffix(".processor")]


def test_one_processor_call_matches_a_hand_computation_float64():
    unet = sd_unet()
    procs = add_user_attention(unet, USER_DIM)
    randomize_values(procs)
    name = next(iter(procs))
    attn = copy.deepcopy(_layer(unet, name)).double()  # the processor is a submodule: copied and cast with it
    proc = attn.processor
    assert isinstance(proc, UserAttnProcessor) and proc.to_k_user.weight.dtype == torch.float64
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection

    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 16, attn.query_dim, generator=g, dtype=torch.float64)
    e = torch.randn(2, 5, attn.cross_attention_dim, generator=g, dtype=torch.float64)
    u = user_tokens(dtype=torch.float64)
    with torch.no_grad():
        text = _attend(attn.to_q(h), attn.to_k(e), attn.to_v(e), attn.heads)
        user = _attend(attn.to_q(h), proc.to_k_user(u), proc.to_v_user(u), attn.heads)
        expected = attn.to_out[0](text + 0.7 * user)
        got = attn(h, encoder_hidden_states=e, user_tokens=u, user_scale=0.7)
        # one user row serves the whole batch; a batch-2 call equals the tiled tokens
        got_one = attn(h, encoder_hidden_states=e, user_tokens=u[:1], user_scale=0.7)
        got_tiled = attn(h, encoder_hidden_states=e, user_tokens=u[:1].expand(2, -1, -1), user_scale=0.7)
        no_user = attn(h, encoder_hidden_states=e)
        stock = AttnProcessor2_0()(attn, h, encoder_hidden_states=e)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (user.abs().max() > 1e-3) and (got - no_user).abs().max() > 1e-3
    torch.testing.assert_close(got_one, got_tiled, rtol=0, atol=0)
    torch.testing.assert_close(no_user, attn.to_out[0](text), rtol=1e-12, atol=1e-12)
    assert torch.equal(no_user, stock)


def test_self_attention_layers_ignore_user_tokens():
    unet = sd_unet()
    procs = add_user_attention(unet, USER_DIM)
    randomize_values(procs)
    names = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    assert names
    g = torch.Generator().manual_seed(6)
    for name in names:
        attn = _layer(unet, name)
        assert isinstance(attn.processor, PlainAttnProcessor)
        h = torch.randn(2, 16, attn.query_dim, generator=g)
        with torch.no_grad():
            got = attn(h, user_tokens=user_tokens(), user_scale=3.0)
            stock = AttnProcessor2_0()(attn, h)
            hand = attn.to_out[0](_attend(attn.to_q(h), attn.to_k(h), attn.to_v(h), attn.heads))
        assert torch.equal(got, stock)
        torch.testing.assert_close(got, hand, rtol=1e-5, atol=1e-6)
    # and a cross-attention processor handed no encoder states (a self-attention call) ignores the tokens too
    attn = _layer(unet, next(iter(procs)))
    h = torch.randn(2, 16, attn.query_dim, generator=g)
    assert attn.cross_attention_dim == attn.query_dim  # so the layer can take a self-attention call
    with torch.no_grad():
        assert torch.equal(attn(h, user_tokens=user_tokens()), AttnProcessor2_0()(attn, h))


def test_user_token_batch_rule():
    unet = sd_unet()
    randomize_values(add_user_attention(unet, USER_DIM))
    inp = unet_inputs(unet, batch=4)
    u = user_tokens(batch=2)
    tiled = torch.cat([u, u])  # row i of the UNet batch gets user row i % 2 (as CFG / pair steps concatenate)
    assert torch.equal(run(unet, inp, user_tokens=u), run(unet, inp, user_tokens=tiled))
    assert not torch.equal(
        run(unet, inp, user_tokens=u), run(unet, inp, user_tokens=u.repeat_interleave(2, 0))
    )
    one_token = run(unet, inp, user_tokens=u[:, 0])  # [B, D]: one token each
    assert torch.equal(one_token, run(unet, inp, user_tokens=u[:, :1]))
    with pytest.raises(ValueError, match="does not divide the UNet batch 4"):
        run(unet, inp, user_tokens=user_tokens(batch=3))
    with pytest.raises(ValueError, match=f"user_tokens must be \\[batch, tokens, {USER_DIM}\\]"):
        run(unet, inp, user_tokens=torch.zeros(4, 3, USER_DIM + 1))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_gradients_reach_the_new_weights_and_only_they_train_on_a_frozen_unet(kind):
    unet = BUILDERS[kind]().train()
    unet.requires_grad_(False)
    procs = add_user_attention(unet, USER_DIM)
    state = user_attention_state_dict(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(state) and len(state) == 2 * len(procs)
    assert set(state) <= set(unet.state_dict())  # registered: the same names as in the UNet's state dict
    n_params = {id(p) for p in unet.parameters()}
    assert all(
        id(getattr(p, w).weight) in n_params for p in procs.values() for w in ("to_k_user", "to_v_user")
    )

    inp = unet_inputs(unet)
    u = user_tokens()

    def grads() -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        unet(**inp, cross_attention_kwargs={"user_tokens": u}).sample.square().mean().backward()
        return {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}

    fresh = grads()
    # at the fresh start only to_v_user moves: to_k_user's gradient goes through to_v_user, which is zero
    assert all(fresh[n].abs().sum() > 0 for n in fresh if n.endswith("to_v_user.weight"))
    assert all(torch.count_nonzero(fresh[n]) == 0 for n in fresh if n.endswith("to_k_user.weight"))
    randomize_values(procs)
    trained = grads()
    assert all(g is not None and g.abs().sum() > 0 for g in trained.values())
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)

    unfrozen = BUILDERS[kind]()
    add_user_attention(unfrozen, USER_DIM)
    assert all(p.requires_grad for p in unfrozen.parameters())  # the rest's requires_grad is left as it was


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_then_load_into_a_fresh_stock_unet_reproduces_outputs(kind, tmp_path):
    unet = BUILDERS[kind]()
    procs = add_user_attention(unet, USER_DIM, scale=0.8)
    randomize_values(procs)
    path = save_user_attention(
        unet, tmp_path / "user.safetensors", {"user_encoder": "mean of 3 liked captions"}
    )

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["format"] == FORMAT == "diffalign-user-attention-v1"
    assert header["user_dim"] == USER_DIM and header["num_layers"] == len(procs) and header["scale"] == 0.8
    assert header["metadata"] == {"user_encoder": "mean of 3 liked captions"}
    assert set(load_file(str(path))) == set(user_attention_state_dict(unet))

    fresh = BUILDERS[kind]()
    inp, u = unet_inputs(fresh), user_tokens()
    base = run(fresh, inp)
    meta = load_user_attention(SimpleNamespace(unet=fresh), path)  # a pipeline-like object: pipe.unet
    assert meta == header
    assert torch.equal(run(fresh, inp, user_tokens=u), run(unet, inp, user_tokens=u))
    assert torch.equal(
        run(fresh, inp, user_tokens=u, user_scale=1.0), run(unet, inp, user_tokens=u, user_scale=1.0)
    )
    assert torch.equal(run(fresh, inp), base)
    for name, tensor in user_attention_state_dict(unet).items():
        assert torch.equal(user_attention_state_dict(fresh)[name], tensor)


def _check_one_line(excinfo, path, *needles) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message


def test_bad_files_give_one_line_errors_and_leave_the_unet_alone(tmp_path):
    unet = sd_unet()
    procs = add_user_attention(unet, USER_DIM)
    good = save_user_attention(unet, tmp_path / "good.safetensors", {})
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    target = sd_unet()

    def attempt(path, *needles):
        with pytest.raises(ValueError) as excinfo:
            load_user_attention(target, path)
        _check_one_line(excinfo, path, *needles)
        assert all(isinstance(p, AttnProcessor2_0) for p in target.attn_processors.values())  # unchanged

    attempt(tmp_path / "absent.safetensors", "no such")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    attempt(garbage, "not a readable safetensors file")

    no_meta = tmp_path / "no_meta.safetensors"
    save_file(tensors, str(no_meta))
    attempt(no_meta, "not a diffalign user-attention file")
    wrong = tmp_path / "wrong_format.safetensors"
    header = {**json.loads(metadata[METADATA_KEY]), "format": "ip-adapter"}
    save_file(tensors, str(wrong), metadata={METADATA_KEY: json.dumps(header)})
    attempt(wrong, "'ip-adapter'", FORMAT)

    missing = tmp_path / "missing.safetensors"
    dropped = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(missing), metadata=metadata)
    attempt(missing, "missing", dropped)
    extra = tmp_path / "extra.safetensors"
    stray = {"mid_block.attn9.processor.to_k_user.weight": torch.zeros(2, USER_DIM)}
    save_file({**tensors, **stray}, str(extra), metadata=metadata)
    attempt(extra, "match no cross-attention layer", "mid_block.attn9")
    shape = tmp_path / "shape.safetensors"
    save_file({**tensors, dropped: torch.zeros(3, USER_DIM)}, str(shape), metadata=metadata)
    attempt(shape, "shape mismatch", dropped, "(3, 6)")

    sdxl = sdxl_unet()
    with pytest.raises(ValueError) as excinfo:
        load_user_attention(sdxl, good)  # an SD1.x file into an SDXL-shaped UNet: other layers
    _check_one_line(excinfo, good)

    with pytest.raises(ValueError, match="no user attention is installed"):
        set_user_scale(sd_unet(), 1.0)
    with pytest.raises(ValueError, match="must hold JSON values"):
        save_user_attention(unet, tmp_path / "bad_meta.safetensors", {"x": object()})
    assert procs  # the source UNet still has its branches


def test_float32_branch_under_a_bfloat16_unet():
    """As training casts trainable weights to float32 under a half-precision UNet (see add_lora)."""
    unet = sd_unet().to(torch.bfloat16)
    procs = add_user_attention(unet, USER_DIM)
    assert all(p.to_k_user.weight.dtype == torch.bfloat16 for p in procs.values())
    randomize_values(procs)
    for proc in procs.values():
        proc.float()
    inp = unet_inputs(unet, dtype=torch.bfloat16)
    out = run(unet, inp, user_tokens=user_tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, run(unet, inp))


def test_user_dim_may_differ_from_cross_attention_dim_and_reinstall_replaces():
    unet = sdxl_unet()
    procs = add_user_attention(unet, 32)
    for name, proc in procs.items():
        attn = _layer(unet, name)
        assert (
            proc.to_k_user.weight.shape == (attn.inner_dim, 32) != (attn.inner_dim, attn.cross_attention_dim)
        )
    again = add_user_attention(unet, USER_DIM)
    assert all(p.user_dim == USER_DIM for p in again.values())
    assert sum(1 for n, _ in unet.named_parameters() if "_user." in n) == 2 * len(again)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def _images(pipe, prompt, seeds, **kwargs) -> np.ndarray:
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    size = {"height": 16, "width": 16}
    out = pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="np",
        generator=generator,
        **size,
        **kwargs,
    )
    return out.images


def test_stock_pipeline_with_guidance_takes_user_tokens(tiny_sd_dir, diffusers_warnings):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    stock = _images(pipe, "a red circle", [0])

    procs = add_user_attention(pipe.unet, USER_DIM)
    u = user_tokens(batch=2)
    kwargs = {"cross_attention_kwargs": {"user_tokens": u[:1], "user_scale": 1.0}}
    assert np.array_equal(_images(pipe, "a red circle", [0], **kwargs), stock)  # fresh branch: the base model

    randomize_values(procs, std=2.0)
    personal = _images(pipe, "a red circle", [0], **kwargs)  # user batch 1, UNet batch 2 (CFG doubles it)
    assert np.abs(personal - stock).max() > 1e-3
    assert np.array_equal(_images(pipe, "a red circle", [0]), stock)
    off = {"cross_attention_kwargs": {"user_tokens": u[:1], "user_scale": 0.0}}
    assert np.array_equal(_images(pipe, "a red circle", [0], **off), stock)

    # two prompts, one user each: UNet batch 4 = [uncond a, uncond b, cond a, cond b]; each image as if alone
    both = _images(pipe, ["a red circle", "a blue square"], [0, 1], cross_attention_kwargs={"user_tokens": u})
    alone_b = _images(pipe, "a blue square", [1], cross_attention_kwargs={"user_tokens": u[1:]})
    np.testing.assert_allclose(both[0], personal[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone_b[0], atol=1e-5)
    assert diffusers_warnings == []


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_init_copies_the_text_projections_and_trains_every_weight_from_the_start(kind):
    """IP-Adapter's initialisation: the branch's key/value projections are copies of the layer's text ones (so user
    tokens equal to the text tokens double the text attention), and both get gradient at the first step (with
    the zero init only ``to_v_user`` does)."""
    unet = BUILDERS[kind]().train()
    width = unet.config.cross_attention_dim
    procs = add_user_attention(unet, width, init="text")
    for name, proc in procs.items():
        attn = _layer(unet, name)
        assert torch.equal(proc.to_k_user.weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_user.weight, attn.to_v.weight)
    inp = unet_inputs(unet)
    text = inp["encoder_hidden_states"]
    unet.zero_grad(set_to_none=True)
    unet(**inp, cross_attention_kwargs={"user_tokens": text}).sample.square().mean().backward()
    for proc in procs.values():
        assert proc.to_k_user.weight.grad.abs().sum() > 0 and proc.to_v_user.weight.grad.abs().sum() > 0
    name, proc = next(iter(procs.items()))
    attn = _layer(unet, name)
    hidden = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        doubled = proc(attn, hidden, encoder_hidden_states=text, user_tokens=text, user_scale=1.0)
        attn.set_processor(AttnProcessor2_0())
        plain_out = attn.to_out
        attn.to_out = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        text_only = attn(hidden, encoder_hidden_states=text)
        attn.to_out = plain_out
        expected = plain_out[1](plain_out[0](2.0 * text_only))
    torch.testing.assert_close(doubled, expected, rtol=1e-5, atol=1e-6)


def test_text_init_needs_tokens_as_wide_as_the_text_and_a_known_name():
    unet = sd_unet()
    with pytest.raises(Exception, match="as wide as the text"):
        add_user_attention(unet, unet.config.cross_attention_dim + 1, init="text")
    with pytest.raises(Exception, match="init must be one of"):
        add_user_attention(unet, USER_DIM, init="random")

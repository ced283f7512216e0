"""RPO and DreamBooth: the losses against hand-computed values, and the two seams they need from the offline step —
each image its own prompt (``caption_1``) and its own (t, ε) (``shared_noise=False``) — plus soft labels."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.data.pair_filter import SOFT_LABEL, TIE, classify_row
from diffalign.data.pair_images import PairTransform, build_example
from diffalign.data.pickapic import collate_pairs
from diffalign.data.pickapic_rows import encode_jpeg
from diffalign.diffusion import parts
from diffalign.errors import ConfigError
from diffalign.objectives.dreambooth import dreambooth_loss
from diffalign.objectives.registry import get_objective, params_from_dict
from diffalign.objectives.rpo import rpo_loss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_rpo_loss_matches_hand_computation():
    # pair 0: model gains 0.02 on the reference image, loses 0.01 on the generated one; p = 0.3
    m_ref, m_gen = torch.tensor([0.10, 0.20]), torch.tensor([0.31, 0.40])
    r_ref, r_gen = torch.tensor([0.12, 0.20]), torch.tensor([0.30, 0.45])
    p = torch.tensor([0.3, 0.5])
    loss, met = rpo_loss(m_ref, m_gen, r_ref, r_gen, p, beta=10.0, preference_weight=2.0)
    # kl = (r_ref - m_ref) - (r_gen - m_gen): pair 0 = 0.02 - (-0.01) = 0.03; pair 1 = 0 - 0.05 = -0.05
    expect = []
    for mr, kl, q in ((0.10, 0.03, 0.3), (0.20, -0.05, 0.5)):
        pref = -q * math.log(_sig(10 * kl)) - (1 - q) * math.log(_sig(-10 * kl))
        expect.append(mr + 2.0 * pref)
    assert loss.tolist() == pytest.approx(expect, rel=1e-6)
    assert met["kl"].tolist() == pytest.approx([0.03, -0.05], abs=1e-7)
    # implicit accuracy: pair 0 has kl > 0 but p < 0.5 (the generated image is more likely preferred): wrong -> 0;
    # pair 1 is a tie: 0.5
    assert met["implicit_acc"].tolist() == [0.0, 0.5]


def test_rpo_gradient_pulls_towards_the_likely_image():
    """With p = 0 (the generated image preferred) the preference term lowers the error on the generated image."""
    m_gen = torch.tensor([0.3], requires_grad=True)
    m_ref = torch.tensor([0.1], requires_grad=True)
    loss, _ = rpo_loss(m_ref, m_gen, torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.0]), beta=5.0)
    loss.sum().backward()
    # d/dm_gen of -log σ(-β kl), kl = ... + m_gen: β σ(β kl) = 5 · 0.5 at kl = 0
    assert m_gen.grad.item() == pytest.approx(2.5)
    assert m_ref.grad.item() == pytest.approx(1.0 - 2.5)  # reconstruction 1, preference −β σ(β kl)... = -2.5


def test_rpo_loss_rejects_bad_shapes_and_beta():
    one = torch.zeros(2)
    with pytest.raises(ValueError, match="one shape"):
        rpo_loss(one, one, one, one, torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        rpo_loss(one, one, one, one, one, beta=0.0)
    with pytest.raises(ConfigError, match="beta"):
        params_from_dict(get_objective("rpo"), {"beta": -1.0})


def test_dreambooth_loss_values():
    loss, met = dreambooth_loss(torch.tensor([0.2, 0.4]))
    assert loss.tolist() == pytest.approx([0.2, 0.4])
    loss, met = dreambooth_loss(torch.tensor([0.2, 0.4]), torch.tensor([0.1, 0.3]), prior_loss_weight=0.5)
    assert loss.tolist() == pytest.approx([0.25, 0.55])
    assert met["prior"].tolist() == pytest.approx([0.1, 0.3])
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        params_from_dict(get_objective("dreambooth_prior"), {"prior_loss_weight": -1})


def test_specs_say_what_the_step_must_do():
    rpo, db, dbp = get_objective("rpo"), get_objective("dreambooth"), get_objective("dreambooth_prior")
    assert rpo.needs_reference and rpo.uses_losers and not rpo.shared_noise
    assert not db.needs_reference and not db.uses_losers and not db.shared_noise
    assert not dbp.needs_reference and dbp.uses_losers
    assert get_objective("dpo").shared_noise
    # the reference-error cache key changes with the noise layout, and stays as it was for shared noise
    key = parts.reference_error_inputs(rpo, params_from_dict(rpo, {}))
    assert key["shared_noise"] is False
    assert "shared_noise" not in parts.reference_error_inputs(get_objective("dpo"), SimpleNamespace())


# ---------------------------------------------------------------------------------------------------------------
# data seams


@pytest.mark.parametrize(
    "labels, expect",
    [
        ((0.3, 0.7), (None, SOFT_LABEL)),
        ((0.9, 0.1), (None, SOFT_LABEL)),
        ((0.5, 0.5), ("tie", 0)),
        ((0.3, 0.6), ("invalid_label", 0)),
        ((1.0, 0.0), (None, 0)),
    ],
)
def test_soft_labels_are_kept_in_source_order(labels, expect):
    assert classify_row("a circle", *labels, True, "drop") == expect
    if labels == (0.5, 0.5):
        assert classify_row("a circle", *labels, True, "keep") == (None, TIE)


def _row(l0, l1, caption_1="a sks circle on the left"):
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[..., 2] = 200
    row = {
        "caption": "a sks circle",
        "jpg_0": encode_jpeg(red),
        "jpg_1": encode_jpeg(blue),
        "label_0": l0,
        "label_1": l1,
    }
    if caption_1 is not None:
        row["caption_1"] = caption_1
    return row


def test_caption_1_follows_its_image_and_soft_label_is_pref_prob():
    t = PairTransform(32, "center", False)
    rng = np.random.default_rng(0)
    ex = build_example(_row(0.3, 0.7), SOFT_LABEL, t, rng)
    assert ex["caption"] == "a sks circle" and ex["caption_1"] == "a sks circle on the left"
    assert ex["pref_prob"] == pytest.approx(0.3) and not ex["is_tie"]
    assert ex["pixel_values"][0, 0].mean() > ex["pixel_values"][0, 2].mean()  # red stays in slot 0
    # a decided pair whose image 1 won is swapped, and the captions with it
    ex = build_example(_row(0.0, 1.0), 1, t, rng)
    assert ex["caption"] == "a sks circle on the left" and ex["caption_1"] == "a sks circle"
    assert ex["pixel_values"][0, 2].mean() > ex["pixel_values"][0, 0].mean()
    batch = collate_pairs([build_example(_row(0.3, 0.7), SOFT_LABEL, t, rng)] * 2)
    assert batch["captions_1"] == ["a sks circle on the left"] * 2
    assert batch["label_w"].tolist() == pytest.approx([0.3, 0.3])
    # data without the column: no captions_1 in the batch (every image shares its pair's caption)
    plain = collate_pairs([build_example(_row(1.0, 0.0, None), 0, t, rng)])
    assert "captions_1" not in plain


def test_independent_noise_streams():
    idx = torch.tensor([3, 7])
    t0, n0, u0 = parts.pair_randomness(idx, parts.slot_seed(5, 0), 1, (4, 2, 2), 1000)
    ts, ns, us = parts.pair_randomness(idx, 5, 1, (4, 2, 2), 1000)
    assert torch.equal(t0, ts) and torch.equal(n0, ns) and torch.equal(u0, us)  # slot 0 = the shared draws
    t1, n1, _ = parts.pair_randomness(idx, parts.slot_seed(5, 1), 1, (4, 2, 2), 1000)
    assert not torch.equal(n0, n1)
    assert parts.slot_seed(5, 1) != parts.slot_seed(6, 1)


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records what it is called with and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states=None, **kw):
        self.calls.append((x.detach().clone(), t.clone(), encoder_hidden_states.detach().clone()))
        return SimpleNamespace(sample=torch.zeros_like(x))


def test_step_gives_each_slot_its_prompt_and_noise():
    import contextlib

    from diffalign.diffusion import noise as dn
    from diffalign.models import pipeline as mp
    from diffalign.training.step import PairStep

    comps = mp.load_components("sandbox")
    unet = _Recorder()

    @contextlib.contextmanager
    def reference():
        yield unet

    spec = get_objective("rpo")
    step = PairStep(
        spec=spec,
        params=params_from_dict(spec, {}),
        comps=comps,
        unet=unet,
        reference=reference,
        alphas_cumprod=dn.scheduler_alphas_cumprod(comps.noise_scheduler),
        weight_dtype=torch.float32,
        empty_text=mp.encode_prompts(comps, [""]),
        seed=3,
        prompt_dropout=0.0,
        resolution=32,
        device=torch.device("cpu"),
    )
    batch = {
        "pixel_values": torch.rand(2, 2, 3, 32, 32) * 2 - 1,
        "captions": ["a sks circle"] * 2,
        "captions_1": ["a sks circle on the left", "a sks circle at the top"],
        "index": torch.tensor([0, 1]),
        "label_w": torch.tensor([0.4, 0.6]),
    }
    loss, metrics = step(batch, epoch=0)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    x, t, ehs = unet.calls[0]  # the policy forward: [ref_0, ref_1, gen_0, gen_1]
    text0 = mp.encode_prompts(comps, batch["captions"])["prompt_embeds"]
    text1 = mp.encode_prompts(comps, batch["captions_1"])["prompt_embeds"]
    assert torch.allclose(ehs[:2], text0) and torch.allclose(ehs[2:], text1)
    assert not torch.allclose(ehs[2], ehs[3])
    # each image its own t (RPO as coded); slot 0 draws what a shared-noise objective would draw
    t_shared, _, _ = parts.pair_randomness(batch["index"], 3, 0, (4, 4, 4), 1000)
    assert torch.equal(t[:2], t_shared)
    t_own, _, _ = parts.pair_randomness(batch["index"], parts.slot_seed(3, 1), 0, (4, 4, 4), 1000)
    assert torch.equal(t[2:], t_own) and not torch.equal(t[:2], t[2:])
    assert metrics["label"].tolist() == pytest.approx([0.4, 0.6])

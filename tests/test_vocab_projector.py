"""User tokens as mixtures of text phrases (``user_vocab``, diffalign/models/vocab_projector.py): the mixture and its
start by hand, the phrase embeddings against a hand-run text encoder, files, oddness, config errors, and a resumed
training run through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import losses, ppd_args, run_script
from safetensors.torch import load_file

from diffalign.models.user_encoder import UserEncoder, make_projector
from diffalign.models.vocab_projector import NEUTRAL_LOGIT, VocabUserProjector, phrase_embeddings
from diffalign.sandbox import SANDBOX_PIPELINE

PHRASES = ["large", "small", "on a black background"]


def _projector(odd_dims: int = 0, seed: int = 0) -> VocabUserProjector:
    p = make_projector(6, 2, 4, 8, vocab_size=3, odd_dims=odd_dims, seed=seed)
    assert isinstance(p, VocabUserProjector)
    p.set_vocab(torch.arange(12, dtype=torch.float32).view(3, 4), PHRASES)
    return p


def test_tokens_are_the_softmax_mixture_of_zero_and_the_phrases_by_hand():
    p = _projector()
    with torch.no_grad():
        p.out.weight.zero_()
        p.out.bias.copy_(torch.tensor([0.0, math.log(2), 0.0, math.log(3), NEUTRAL_LOGIT, 0.0, 0.0, 0.0]))
    tokens = p(torch.randn(1, 3, 6))
    # token 0: weights (1, 2, 1, 3) / 7 over (0, E1, E2, E3); token 1: e^4 on zero, 1 on each phrase
    e = torch.arange(12, dtype=torch.float32).view(3, 4)
    want0 = (2 * e[0] + e[1] + 3 * e[2]) / 7
    want1 = (e[0] + e[1] + e[2]) / (math.exp(NEUTRAL_LOGIT) + 3)
    assert torch.allclose(tokens[0, 0], want0, atol=1e-6) and torch.allclose(tokens[0, 1], want1, atol=1e-6)
    assert torch.equal(p.vocab[0], torch.zeros(4))  # the zero entry stays zero


def test_a_fresh_projector_starts_on_the_zero_entry():
    state = torch.get_rng_state()
    p = make_projector(6, 4, 32, 16, vocab_size=19, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the global RNG where it was
    weights = p.mixture(torch.zeros(1, 16))  # a zero pooled input leaves the bias alone
    want = math.exp(NEUTRAL_LOGIT) / (math.exp(NEUTRAL_LOGIT) + 19)
    assert torch.allclose(weights[..., 0], torch.full((1, 4), want), atol=1e-6)
    assert abs(want - 0.742) < 1e-3
    torch.testing.assert_close(p.mixture(torch.ones(2, 16)).sum(-1), torch.ones(2, 4))


def test_odd_vocab_projector_mirrors_the_logits_of_opposite_answers():
    """With the pair MLP odd in the choices, answering every pair the other way negates W·h: the two users'
    logits sum to twice the bias."""
    p = _projector(odd_dims=2, seed=1)
    f = torch.randn(1, 3, 6)
    flipped = torch.cat([-f[..., :2], f[..., 2:]], dim=-1)
    h = lambda x: p.embed_pairs(x).mean(1)  # noqa: E731  (mean pool, no mask)
    torch.testing.assert_close(p.out(h(f)) + p.out(h(flipped)), 2 * p.out.bias[None], atol=1e-5, rtol=0)


def test_phrase_embeddings_average_the_phrase_tokens_of_the_text_encoder():
    from diffalign.models.pipeline import load_components

    comps = load_components(str(SANDBOX_PIPELINE))
    got = phrase_embeddings(comps, PHRASES)
    tok, enc = comps.tokenizers[0], comps.text_encoders[0]
    ids = tok(
        ["on a black background"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    )
    n = len(tok("on a black background").input_ids)  # start, 4 words' tokens, end
    with torch.no_grad():
        states = enc(ids.input_ids)[0][0]
    assert got.shape == (3, comps.unet.config.cross_attention_dim)
    torch.testing.assert_close(got[2], states[1 : n - 1].mean(0))
    assert not torch.allclose(got[0], got[1])
    with pytest.raises(ValueError, match="non-empty phrases"):
        phrase_embeddings(comps, ["large", " "])


def test_saved_vocab_encoder_loads_with_its_phrases_and_gives_the_same_tokens(tmp_path):
    p = _projector(seed=2)
    enc = UserEncoder(p, featurizer_config={"kind": "clip", "model_path": "sandbox-clip"})
    enc.save(tmp_path / "enc")
    back = UserEncoder.load(tmp_path / "enc", load_featurizer=False)
    assert isinstance(back.projector, VocabUserProjector) and back.projector.phrases == PHRASES
    f = torch.randn(2, 3, 6)
    assert torch.equal(back.embed_features(f), enc.embed_features(f))
    assert back.digest() == enc.digest()
    assert (
        back.config()["vocab_size"] == 3
        and "vocab_size"
        not in UserEncoder(make_projector(6, 2, 4, 8), featurizer_config={"kind": "clip"}).config()
    )


def test_the_fit_learns_each_users_phrase_from_its_labels():
    """Two users with opposite answers and opposite tastes: user 0 prefers images along phrase 1's text direction
    ("large"), user 1 along phrase 2's, its opposite ("small"). The fit must raise the pairwise accuracy from chance to (almost) all pairs, put each user's weight on its
    own phrase, and beat one shared weight vector, which can only be right for one of them; before the fit the
    score is hand-computed from the starting mixture."""
    from diffalign.models.vocab_projector import fit_vocab_preferences

    torch.manual_seed(0)
    p = make_projector(6, 2, 4, 16, vocab_size=3, odd_dims=2, seed=0)
    p.set_vocab(torch.randn(3, 4), PHRASES)
    text = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0]])  # "large" = -"small"; a third, unrelated
    context = torch.randn(1, 2, 6).repeat(2, 1, 1)
    context[1, :, :2] *= -1  # user 1 answered every context pair the other way
    mask = torch.ones(2, 2, dtype=torch.bool)
    row_user = torch.tensor([0] * 40 + [1] * 40)
    diff = torch.randn(80, 3) * 0.3
    diff[:40, 0] += 1.0  # user 0's preferred images lean along phrase 1 ("large")
    diff[40:, 0] -= 1.0  # user 1's along phrase 2 ("small")
    w0 = p.mixture(p.pooled(context, mask)).mean(1)[:, 1:].detach()
    want_before = torch.nn.functional.softplus(-10.0 * (diff @ text.T * w0[row_user]).sum(1)).mean()
    stats = fit_vocab_preferences(p, context, mask, row_user, diff, text, steps=300, lr=5e-2)
    assert abs(stats["before_loss"] - float(want_before)) < 1e-5
    assert stats["after_accuracy"] > 0.95 and stats["after_shared_accuracy"] < 0.7, stats
    w = p.mixture(p.pooled(context, mask)).mean(1)[:, 1:]
    assert w[0].argmax() == 0 and w[1].argmax() == 1


def test_vocab_config_errors():
    from diffalign.errors import ConfigError
    from diffalign.objectives.ppd import PPDParams

    with pytest.raises(ConfigError, match="user_vocab needs user_branch_init: text"):
        PPDParams(user_vocab=["large"])
    with pytest.raises(ConfigError, match="user_vocab needs non-empty phrases"):
        PPDParams(user_vocab=["large", ""], user_branch_init="text")
    with pytest.raises(ConfigError, match="user_vocab_fit_steps needs user_vocab"):
        PPDParams(user_vocab=["large"], user_branch_init="text", user_vocab_fit_steps=10)
    with pytest.raises(ValueError, match="need 3 phrases"):
        _projector().set_vocab(torch.zeros(2, 4), PHRASES[:2])


def _args(data, out, *extra, steps=4):
    return ppd_args("configs/sandbox_ppd_vocab.yaml", data, out, *extra, steps=steps)


@pytest.mark.parametrize(
    "fit",
    [("--user_vocab_fit_steps", "0"), ("--user_vocab_fit_steps", "20")],
    ids=["dpo-only", "fitted-first"],
)
def test_vocab_config_trains_resumes_exactly_and_exports_the_phrases(ppd_data, tmp_path, fit):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    proc = run_script(_args(ppd_data, straight, *fit), timeout=900)
    fitted = fit[1] != "0"
    assert ("projector frozen" in proc.stdout + proc.stderr) == fitted
    run_script(_args(ppd_data, cut, *fit, "--max_train_steps", "2"), timeout=900)
    first_leg = load_file(cut / "user_encoder" / "user_projector.safetensors")
    run_script(_args(ppd_data, cut, *fit, "--resume_from_checkpoint", str(cut / "checkpoint-2")), timeout=900)
    for name in ("lora/pytorch_lora_weights.safetensors", "user_attention.safetensors",
                 "user_encoder/user_projector.safetensors"):  # fmt: skip
        a, b = load_file(straight / name), load_file(cut / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, name
    assert losses(straight)[2:] == losses(cut)[-2:]
    assert abs(losses(straight)[0] - math.log(2)) > 1e-5  # the text-like branch acts from the first step
    last = load_file(cut / "user_encoder" / "user_projector.safetensors")  # frozen after the fit: unchanged
    assert all(torch.equal(first_leg[k], last[k]) for k in last) == fitted
    enc = UserEncoder.load(straight / "user_encoder", load_featurizer=False)
    assert isinstance(enc.projector, VocabUserProjector) and len(enc.projector.phrases) == 19
    assert enc.projector.phrases[0] == "large" and torch.equal(enc.projector.vocab[0], torch.zeros(32))

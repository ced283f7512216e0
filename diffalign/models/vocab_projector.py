"""A user projector whose tokens are soft choices among text phrases: taste in the words the UNet already reads.

:class:`~diffalign.models.user_encoder.UserProjector` writes user tokens anywhere in the text-encoder's output space;
a decoupled cross-attention initialised from the text projections (``user_branch_init: text``) then reads them as
text it has never seen, and on the sandbox multi-user DPO never taught it to read taste there (README, PPD). What
users disagree about here -- size, colour temperature, background, outline, position -- is what captions can name,
and the UNet already draws what they name. :class:`VocabUserProjector` therefore makes every user token a mixture of
the text encoder's embeddings of ``M`` phrases (``user_vocab``, e.g. "large", "small", "on a black background"),
plus one all-zero entry:

    logits = W · pool_j h_j + b                      [N, M + 1]      (h_j: the pair MLP, odd in the choices if asked)
    token_n = softmax(logits_n) · [0; E]             E[m] = mean of phrase m's token states in the text encoder

The zero entry is "no taste": a token that is mostly zero moves the branch's keys and values towards zero, so its
weight acts as the token's strength, and ``b`` starts on it (:data:`NEUTRAL_LOGIT`) so that a fresh projector
conditions weakly. ``E`` is a buffer (not trained, saved with the weights); the phrases are recorded in
``user_encoder.json``. Interpolating two users' tokens stays inside the phrases' convex hull.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .odd_projector import odd_difference
from .user_encoder import UserProjector

NEUTRAL_LOGIT = 4.0  # the zero entry's starting logit: weight e^4 / (e^4 + M) on "no taste" (0.74 for M = 19)


class VocabUserProjector(UserProjector):
    """:class:`UserProjector` whose tokens are mixtures of ``vocab_size`` phrase embeddings and zero (module doc)."""

    def __init__(self, feature_dim: int, num_tokens: int, token_dim: int, hidden: int = 256, pool: str = "mean",
                 *, vocab_size: int, odd_dims: int = 0, seed: int = 0) -> None:  # fmt: skip
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not 0 <= odd_dims <= feature_dim:
            raise ValueError(f"odd_dims must be in [0, F={feature_dim}], got {odd_dims}")
        super().__init__(feature_dim, num_tokens, token_dim, hidden, pool, seed=seed)
        self.vocab_size, self.odd_dims = int(vocab_size), int(odd_dims)
        self.phrases: list[str] = []
        # as in the base class: nn.Linear's own init must not move the global RNG
        with torch.random.fork_rng(devices=[]):
            out = nn.Linear(hidden, self.num_tokens * (self.vocab_size + 1))
        bound = 1.0 / hidden**0.5
        generator = torch.Generator().manual_seed(int(seed) + 1)
        with torch.no_grad():  # seeded like the rest; the bias starts every token on the zero entry
            out.weight.copy_(torch.rand(out.weight.shape, generator=generator) * (2 * bound) - bound)
            out.bias.zero_()
            out.bias.view(self.num_tokens, self.vocab_size + 1)[:, 0] = NEUTRAL_LOGIT
        self.out = out
        self.norm = nn.Identity()
        self.register_buffer("vocab", torch.zeros(self.vocab_size + 1, self.token_dim))

    def set_vocab(self, embeddings: Tensor, phrases: Sequence[str]) -> None:
        """The phrase embeddings ``[M, D]`` (row 0 of :attr:`vocab`, the zero entry, stays zero)."""
        if tuple(embeddings.shape) != (self.vocab_size, self.token_dim) or len(phrases) != self.vocab_size:
            raise ValueError(
                f"need {self.vocab_size} phrases and embeddings [{self.vocab_size}, {self.token_dim}], got "
                f"{len(phrases)} and {list(embeddings.shape)}"
            )
        with torch.no_grad():
            self.vocab[1:] = embeddings.to(self.vocab)
        self.phrases = [str(p) for p in phrases]

    def embed_pairs(self, features: Tensor) -> Tensor:
        if self.odd_dims:
            return odd_difference(self.pair_mlp, features, self.odd_dims)
        return self.pair_mlp(features)

    def mixture(self, pooled: Tensor) -> Tensor:
        """Each token's weights over ``[zero, phrase 1 .. M]``: ``[B, N, M + 1]``."""
        return self.out(pooled).view(len(pooled), self.num_tokens, self.vocab_size + 1).softmax(dim=-1)

    def to_tokens(self, pooled: Tensor) -> Tensor:
        return self.mixture(pooled) @ self.vocab.to(pooled.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vocab={self.vocab_size}, odd_dims={self.odd_dims}"


@torch.no_grad()
def phrase_embeddings(components, phrases: Sequence[str]) -> Tensor:
    """``[M, D]``: each phrase's text-encoder states (as the pipeline conditions on them: SD1.x last layer, SDXL both
    encoders' penultimate concatenated), averaged over the phrase's own tokens (start and end tokens left out)."""
    from .pipeline import encode_prompts

    if not phrases or any(not str(p).strip() for p in phrases):
        raise ValueError(f"user_vocab needs non-empty phrases, got {list(phrases)!r}")
    states = encode_prompts(components, [str(p) for p in phrases])["prompt_embeds"].float().cpu()
    tok = components.tokenizers[0]
    lengths = [len(tok(str(p), truncation=True, max_length=tok.model_max_length).input_ids) for p in phrases]
    return torch.stack([states[i, 1 : max(n - 1, 2)].mean(0) for i, n in enumerate(lengths)])


def fit_vocab_preferences(
    projector: VocabUserProjector,
    context: Tensor,
    context_mask: Tensor,
    row_user: Tensor,
    row_diff: Tensor,
    phrase_text: Tensor,
    steps: int,
    lr: float = 1e-2,
) -> dict[str, float]:
    """Fit the projector as a per-user preference model before any DPO step (``user_vocab_fit_steps``).

    User ``u``'s tokens ``token_un = softmax(logits_un) · [0; E]`` give its phrase weights ``w_u = mean_n
    softmax(logits_un)[1:]`` (``[M]``); a pair of ``u`` whose preferred-minus-rejected image embedding is ``d`` (unit
    length, the pair encoder's difference block) is scored ``s = τ · Σ_m w_um ⟨d, t_m⟩`` with ``t_m`` the CLIP text
    embedding of phrase ``m``, and the fit minimises the Bradley–Terry loss ``mean log(1 + e^{−s})`` over every
    decided training pair (all read preferred first) by full-batch Adam on the projector and ``log τ`` (start
    ``τ = 10``). So the tokens say, in the phrases, what each user chose; the phrase embeddings ``E`` themselves do
    not change.

    ``context [U, k, F]`` / ``context_mask [U, k]``: each user's context features; ``row_user [R]``: the user index
    (into ``context``) of each training pair; ``row_diff [R, C]``: its difference block; ``phrase_text [M, C]``.
    Returns the loss and pairwise accuracy before and after, and the accuracy of one shared weight vector (the
    users' mean ``w``), the population's."""
    log_tau = torch.tensor(float(torch.log(torch.tensor(10.0))), requires_grad=True)
    sims = row_diff.float() @ phrase_text.float().T  # [R, M]

    def weights() -> Tensor:
        return projector.mixture(projector.pooled(context, context_mask)).mean(dim=1)[:, 1:]  # [U, M]

    def scores(w: Tensor) -> Tensor:
        return log_tau.exp() * (sims * w[row_user]).sum(dim=1)

    def stats(prefix: str) -> dict[str, float]:
        with torch.no_grad():
            w = weights()
            s, shared = scores(w), scores(w.mean(0, keepdim=True).expand_as(w))
            return {f"{prefix}_loss": float(torch.nn.functional.softplus(-s).mean()),
                    f"{prefix}_accuracy": float((s > 0).float().mean()),
                    f"{prefix}_shared_accuracy": float((shared > 0).float().mean())}  # fmt: skip

    out = stats("before")
    optimizer = torch.optim.Adam([*projector.parameters(), log_tau], lr=lr)
    for _ in range(int(steps)):
        optimizer.zero_grad()
        torch.nn.functional.softplus(-scores(weights())).mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left for a later step's clipping norm to count
    out.update(stats("after"), tau=float(log_tau.detach().exp()))
    return out

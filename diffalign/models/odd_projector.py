"""A user projector that reads only what the choices say: odd in the preference direction.

:class:`~diffalign.models.user_encoder.UserProjector` maps context features to user tokens. Its features carry both
*what was shown* (the images' sum, the caption) and *what was chosen* (the preferred-minus-rejected block, whose
sign flips when a pair is read the other way round). On the sandbox the shown part dominates: two users who
answered the same pairs in opposite ways got tokens with cosine 0.993, and PPD could not learn to tell them apart.

:class:`OddUserProjector` makes the embedding an odd function of the choices: with ``s(f)`` the features of the
same pairs answered the other way (the first ``odd_dims`` features negated),

    h_j = MLP(f_j) − MLP(s(f_j)),     tokens = LN₀(W · pool_j h_j)          (no bias in W, in the MLP's last layer, or in the LayerNorm)

so reading every pair the other way round negates the tokens exactly, and pairs whose two images do not differ give
zero. The shown part still steers the MLP (which differences matter for which caption), but cannot put a common
offset into every user's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .user_encoder import UserProjector


class OddUserProjector(UserProjector):
    """:class:`UserProjector` made odd in the first ``odd_dims`` features (the module docstring)."""

    def __init__(self, feature_dim: int, num_tokens: int, token_dim: int, hidden: int = 256, pool: str = "mean",
                 *, odd_dims: int, seed: int = 0) -> None:  # fmt: skip
        if not 0 < odd_dims <= feature_dim:
            raise ValueError(f"odd_dims must be in [1, F={feature_dim}], got {odd_dims}")
        super().__init__(feature_dim, num_tokens, token_dim, hidden, pool, seed=seed)
        self.odd_dims = int(odd_dims)
        # biases after the odd difference would cancel or break the oddness: the MLP's last layer, the output
        # layer and the LayerNorm go without (same weights as the plain projector's initialisation otherwise)
        self.pair_mlp[2] = _without_bias(self.pair_mlp[2])
        self.out = _without_bias(self.out)
        self.norm = nn.LayerNorm(self.token_dim, bias=False)

    def embed_pairs(self, features: Tensor) -> Tensor:
        """``MLP(f) − MLP(s(f))``: odd in the difference block."""
        return odd_difference(self.pair_mlp, features, self.odd_dims)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", odd_dims={self.odd_dims}"


def odd_difference(mlp: nn.Module, features: Tensor, odd_dims: int) -> Tensor:
    """``mlp(f) − mlp(s(f))``, ``s`` negating the first ``odd_dims`` features (the pairs answered the other way)."""
    swapped = torch.cat([-features[..., :odd_dims], features[..., odd_dims:]], dim=-1)
    return mlp(features) - mlp(swapped)


def _without_bias(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=False)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
    return out

"""A control "reward" that carries no preference: a deterministic pseudo-random number per (image, prompt).

Training on it tells how much of a method's measured gain would appear without any reward signal at all: the
updates then have the loop's full noise (sampling, advantage normalisation, clipping, the optimiser) and no
direction. A win rate that a run on the real reward does not beat by more than the seeds' spread is not evidence
that the method followed its reward.

:func:`permute_within_groups` is the matched control for any reward (``reward_control: permute`` of the online
loop): each prompt keeps exactly its rewards, shuffled among its images.

The score is ``blake2b(prompt, uint8 image bytes) / 2**64``: uniform on [0, 1), independent of what the image shows
(two images that differ in one pixel get unrelated scores), and a pure function of its input, so resumed runs agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.rewards.base import ImageInput, check_prompts, to_pil_list


class RandomControlReward:
    """Uniform pseudo-random scores keyed by the image's bytes and the prompt (no parameters, CPU).

    Args:
        salt: mixed into the hash; two salts give independent scores for the same input.
        device: where the returned score tensors are put.
    """

    aspects: tuple[str, ...] = ()

    def __init__(self, salt: str = "", *, name: str = "sandbox-random-control", device="cpu") -> None:
        self.salt = str(salt)
        self.name = name
        self.device = torch.device(device)
        self.differentiable = False

    def to(self, device=None, dtype=None) -> RandomControlReward:
        if device is not None:
            self.device = torch.device(device)
        return self

    def score(self, images: ImageInput, prompts: Sequence[str] | str) -> Tensor:
        prompts = check_prompts(images, prompts)
        values = []
        for image, prompt in zip(to_pil_list(images), prompts, strict=True):
            h = hashlib.blake2b(digest_size=8)
            h.update(self.salt.encode())
            h.update(b"\0" + prompt.encode() + b"\0")
            h.update(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes())
            values.append(int.from_bytes(h.digest(), "little") / 2.0**64)
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def score_aspects(self, images: ImageInput, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        return {self.name: self.score(images, prompts)}


def permute_within_groups(rewards: Tensor, groups: Tensor, seeds: Sequence[int]) -> Tensor:
    """``rewards`` with the values of each group (the images of one prompt) shuffled among that group's rows.

    ``seeds[i]``: the seed of group ``unique(groups)[i]``'s permutation (the loop passes one per (seed, epoch,
    prompt)), so a group's result does not depend on the other groups. Each group keeps its multiset of
    values: the same scale, spread and within-prompt differences, with no link to which image earned them.
    """
    out = rewards.clone()
    ids = torch.unique(groups)
    if len(ids) != len(seeds):
        raise ValueError(f"got {len(seeds)} seeds for {len(ids)} groups")
    for g, seed in zip(ids.tolist(), seeds, strict=True):
        rows = (groups == g).nonzero().flatten()
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(seed)))
        out[rows] = rewards[rows[perm]]
    return out

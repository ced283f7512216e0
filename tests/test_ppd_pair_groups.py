"""PPD's ``user_pair_groups``: the copies of one image pair that different users labelled are shuffled as a block
(so they share a batch) and draw the same timestep and noise (so within a block only the user tokens differ).
Exact orders against hand-derived ones, the grouping of a real build, and a grouped run that resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import losses, run_script
from safetensors.torch import load_file
from test_ppd_train import _args as ppd_train_args

from diffalign.data.sampler import EpochShuffleSampler, grouped_permutation


def test_grouped_permutation_shuffles_whole_groups_in_the_seeded_order():
    groups = np.array([7, 5, 7, 9, 5, 7])  # group 5: positions 1, 4; group 7: 0, 2, 5; group 9: 3
    for seed, epoch in ((0, 0), (3, 1)):
        order = grouped_permutation(groups, seed, epoch)
        # by hand: the distinct ids sorted (5, 7, 9), visited in default_rng([seed, epoch]).permutation(3)
        members = {5: [1, 4], 7: [0, 2, 5], 9: [3]}
        ids = np.array([5, 7, 9])[np.random.default_rng([seed, epoch]).permutation(3)]
        assert order.tolist() == [p for g in ids for p in members[g]]
    orders = {tuple(grouped_permutation(groups, 0, e)) for e in range(12)}
    assert len(orders) > 1  # reshuffled across epochs, always whole groups
    for o in orders:
        blocks = [groups[p] for p in o]
        assert sorted(o) == list(range(6))
        assert len([i for i in range(1, 6) if blocks[i] != blocks[i - 1]]) == 2  # 3 contiguous blocks


def test_grouped_sampler_resumes_mid_epoch_and_rejects_a_wrong_length():
    groups = np.repeat(np.arange(10), 3)
    s = EpochShuffleSampler(30, seed=1)
    s.set_groups(groups)
    s.set_epoch(2)
    full = list(s)
    assert full == [60 + int(p) for p in grouped_permutation(groups, 1, 2)]
    s.set_start(11)
    assert list(s) == full[11:]
    s.set_groups(None)
    s.set_epoch(2)
    assert list(s) != full  # plain shuffle again
    with pytest.raises(ValueError, match="groups has 29 entries"):
        s.set_groups(groups[:29])


@pytest.fixture(scope="module")
def ppd_data(tmp_path_factory):
    from diffalign.data.ppd import build_ppd_data

    out = tmp_path_factory.mktemp("ppd-groups") / "data"
    build_ppd_data(out, max_source_pairs=120, users_per_pair=3)
    return out


def test_pair_groups_of_a_build_are_its_source_pairs(ppd_data):
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from diffalign.data.pickapic import PickAPicPairs
    from diffalign.data.schema import split_path
    from diffalign.training.data import pair_groups

    cfg = SimpleNamespace(dataset=str(ppd_data), split="train")
    pairs = PickAPicPairs(str(ppd_data), split="train", tie_policy="drop")
    groups, leaders = pair_groups(cfg, pairs)
    table = pq.read_table(split_path(ppd_data, "train"), columns=["image_0_uid", "image_1_uid", "user_id"])
    uids = [
        tuple(sorted(x)) for x in zip(*(table.column(c).to_pylist() for c in ("image_0_uid", "image_1_uid")))
    ]
    users = table.column("user_id").to_pylist()
    rows = np.asarray(pairs.rows)
    assert len(groups) == len(rows) and set(leaders) == set(rows.tolist())
    for r in rows.tolist():
        lead = leaders[r]
        assert (
            uids[lead] == uids[r] and lead <= r and lead == min(i for i, u in enumerate(uids) if u == uids[r])
        )
    sizes = np.unique(groups, return_counts=True)[1]
    assert sizes.max() == 3 and sizes.min() >= 1  # 3 users per pair; a copy the user ties on is dropped
    for g in np.unique(groups)[:20]:  # the copies of a pair belong to different users
        members = rows[groups == g]
        assert len({users[r] for r in members}) == len(members)


def _args(data, out, *extra):
    return ppd_train_args(
        data, out, "--user_pair_groups", "true", *extra
    )  # batch 8: whole groups and cut ones


def test_grouped_ppd_run_resumes_exactly(ppd_data, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_script(_args(ppd_data, straight), timeout=900)
    run_script(_args(ppd_data, cut, "--max_train_steps", "2"), timeout=900)
    run_script(_args(ppd_data, cut, "--resume_from_checkpoint", str(cut / "checkpoint-2")), timeout=900)
    for name in ("lora/pytorch_lora_weights.safetensors", "user_attention.safetensors"):
        a, b = load_file(straight / name), load_file(cut / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, name
    assert losses(straight)[2:] == losses(cut)[-2:]
    assert json.loads((straight / "config.json").read_text())["user_pair_groups"] is True


def test_the_copies_of_a_pair_are_noised_alike_in_the_step():
    """Rows 0 and 1 copy one image pair (other users), row 2 is another pair: with ``noise_rows`` the copies draw
    the (t, ε) of their group's first row, so their noised latents are identical; without it each row its own."""
    import contextlib
    from types import SimpleNamespace

    import torch

    from diffalign.diffusion import noise as dn
    from diffalign.diffusion import parts
    from diffalign.models import pipeline as mp
    from diffalign.objectives.registry import get_objective, params_from_dict
    from diffalign.training.step import PairStep

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x, t, encoder_hidden_states=None, **kw):
            self.calls.append((x.detach().clone(), t.clone()))
            return SimpleNamespace(sample=torch.zeros_like(x))

    comps = mp.load_components("sandbox")
    spec = get_objective("dpo")
    pix = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    pix[1] = pix[0]  # the same images, labelled by another user
    batch = {"pixel_values": pix, "captions": ["a red circle"] * 3, "index": torch.tensor([10, 11, 12]),
             "label_w": torch.ones(3)}  # fmt: skip
    seen = {}
    for grouped in (False, True):
        unet = Recorder()
        step = PairStep(
            spec=spec, params=params_from_dict(spec, {}), comps=comps, unet=unet,
            reference=lambda u=unet: contextlib.nullcontext(u),
            alphas_cumprod=dn.scheduler_alphas_cumprod(comps.noise_scheduler), weight_dtype=torch.float32,
            empty_text=mp.encode_prompts(comps, [""]), seed=3, prompt_dropout=0.0, resolution=32,
            device=torch.device("cpu"),
        )  # fmt: skip
        step.noise_rows = {10: 10, 11: 10, 12: 12} if grouped else None
        step(batch, epoch=1)
        seen[grouped] = unet.calls[0]  # the policy forward: [w_0, w_1, w_2, l_0, l_1, l_2]
    x, t = seen[True]
    want_t, _, _ = parts.pair_randomness(torch.tensor([10, 10, 12]), 3, 1, (4, 4, 4), 1000)
    assert torch.equal(t[:3], want_t) and torch.equal(x[0], x[1]) and torch.equal(x[3], x[4])
    assert not torch.equal(x[0], x[2])
    x, t = seen[False]
    assert torch.equal(t[:3], parts.pair_randomness(batch["index"], 3, 1, (4, 4, 4), 1000)[0])
    assert not torch.equal(x[0], x[1])  # same images, own draws

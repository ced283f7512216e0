"""The reference-error cache: stored reference errors are the ones a run computes, a reusing run skips the reference
forward and trains bit-identically, loss-only hyperparameters share the store, and everything that changes the
reference's errors (seed, data, noising) gets another one."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import losses, make_tiny, run_script, tiny_args

from diffalign.diffusion.parts import reference_error_inputs
from diffalign.training.reference_cache import ReferenceErrorCache, key_digest, open_cache


def test_stored_errors_round_trip_through_part_files(tmp_path):
    key = {"a": 1}
    c = open_cache(tmp_path, key)
    idx = torch.tensor([7, 3, 11])
    err = torch.tensor([0.1, 0.2, 0.3, 1.1, 1.2, 1.3])  # stacked [winners(7, 3, 11), losers(7, 3, 11)]
    assert c.lookup(0, idx) is None and c.misses == 3
    c.add(0, idx, err)
    assert torch.equal(c.lookup(0, idx), err)  # this run's entries answer at once
    assert torch.equal(c.lookup(0, torch.tensor([11, 7])), torch.tensor([0.3, 0.1, 1.3, 1.1]))
    assert c.lookup(1, idx) is None  # another epoch: other noise, other errors
    assert c.lookup(0, torch.tensor([7, 4])) is None  # one pair missing: the whole batch is computed
    path = c.flush()
    assert path is not None and path.name.startswith("part-r0-") and c.flush() is None  # nothing new
    again = open_cache(tmp_path, key)
    assert again.directory == c.directory and again.stored_entries == 3
    assert torch.equal(
        again.lookup(0, torch.tensor([3, 11, 7])), torch.tensor([0.2, 0.3, 0.1, 1.2, 1.3, 1.1])
    )
    assert open_cache(tmp_path, {"a": 2}).stored_entries == 0  # another key, another directory
    assert (c.directory / "key.json").read_text().count(key_digest(key)) == 1


def test_winners_only_layout_and_ignored_foreign_files(tmp_path):
    c = ReferenceErrorCache(tmp_path / "x", {"k": 1}, k=1)
    c.add(2, torch.tensor([5, 6]), torch.tensor([0.5, 0.6]))
    c.flush()
    (tmp_path / "x" / "part-r9-torn.safetensors").write_bytes(b"not a safetensors file")
    again = ReferenceErrorCache(tmp_path / "x", {"k": 1}, k=1)
    assert again.files_read == 1 and torch.equal(
        again.lookup(2, torch.tensor([6, 5])), torch.tensor([0.6, 0.5])
    )


def _spec(noising="gaussian", error_space="target", timesteps="uniform"):
    return SimpleNamespace(noising=noising, error_space=error_space, timesteps=timesteps)


def test_what_the_reference_errors_depend_on():
    dpo = reference_error_inputs(_spec(), SimpleNamespace(beta=500, loss_type="sigmoid"))
    assert dpo == {"timesteps": "uniform", "grid": [], "noising": "gaussian", "error_space": "target",
                   "error_weighting": "none"}  # fmt: skip
    # beta and the loss type are not in it: a beta sweep shares the stored errors
    assert reference_error_inputs(_spec(), SimpleNamespace(beta=5000)) == dpo
    inv = SimpleNamespace(inversion_model="current", inversion_steps=10, inversion_eta=0.1)
    assert reference_error_inputs(_spec("ddim_inversion"), inv) is None  # x_t depends on the trained model
    inv.inversion_model = "reference"
    got = reference_error_inputs(_spec("ddim_inversion"), inv)
    assert got["inversion_steps"] == 10 and got["inversion_eta"] == 0.1
    grid = reference_error_inputs(
        _spec(timesteps="grid", error_space="x0"),
        SimpleNamespace(timestep_grid=(249, 999), error_weighting="snr"),
    )
    assert grid["grid"] == [249, 999] and grid["error_weighting"] == "snr"
    # PPD's user_pair_groups keys (t, noise) by the image pair, not the row: other stored errors
    grouped = reference_error_inputs(_spec(), SimpleNamespace(user_pair_groups=True))
    assert grouped == {**dpo, "noise_keys": "image-pair groups"}
    assert reference_error_inputs(_spec(), SimpleNamespace(user_pair_groups=False)) == dpo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("refcache"))


def _read(stdout: str) -> tuple[int, int]:
    m = re.search(r"reference errors: (\d+) of (\d+) pairs read from the cache", stdout)
    assert m, stdout[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_a_run_reusing_stored_reference_errors_trains_bit_identically(tiny, tmp_path):
    cache = ["--cache_dir", str(tmp_path / "cache")]

    def run(name, *extra):
        out = tmp_path / name
        proc = run_script(tiny_args(tiny["sd"], tiny["data"], out, *extra, checkpointing=0))
        return losses(out), proc.stdout

    plain, out_plain = run("plain", "--reference_cache", "false")
    assert "reference cache  off" in out_plain
    first, out_first = run("first", "--reference_cache", "true", *cache)
    assert _read(out_first) == (0, 24)  # 6 steps x 4 pairs, all computed and stored
    again, out_again = run("again", "--reference_cache", "true", *cache)
    assert _read(out_again) == (24, 24)  # every reference forward skipped
    assert first == plain and again == plain  # bit for bit
    assert plain[-1] != plain[0]  # the runs did train

    # A loss-only hyperparameter shares the stored errors; the seed (other t and noise) does not.
    _, out_beta = run("beta", "--beta", "123", *cache)
    assert _read(out_beta) == (24, 24)
    _, out_seed = run("seed", "--seed", "1", *cache)
    assert _read(out_seed) == (0, 24)


def test_objectives_whose_noised_input_depends_on_the_model_are_not_cached(tiny, tmp_path):
    out = tmp_path / "inpo"
    args = tiny_args(tiny["sd"], tiny["data"], out, "--objective", "inpo", "--inversion_steps", "2", steps=2,
                     checkpointing=0)  # fmt: skip
    proc = run_script(args)
    assert "reference cache  not applicable" in proc.stdout
    assert "reference errors:" not in proc.stdout

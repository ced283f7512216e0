"""environment.json: each start of a run records where it ran (versions, CPU, commit), appended on resume."""

from __future__ import annotations

import json
import subprocess

import torch

from diffalign.training import environment


def test_describe_reads_this_process():
    e = environment.describe(processes=2, mixed_precision="bf16", deterministic=True, resumed=True)
    assert e["torch"]["version"] == torch.__version__ and e["torch"]["threads"] == torch.get_num_threads()
    assert e["processes"] == 2 and e["mixed_precision"] == "bf16" and e["deterministic"] is True
    assert e["resumed"] is True and e["cpu"]["logical_cores"] >= 1
    import diffusers

    assert e["packages"]["diffusers"] == diffusers.__version__
    assert e["packages"]["xformers"] is None or isinstance(e["packages"]["xformers"], str)
    json.dumps(e)  # serialisable as written


def test_git_state_names_the_checkout_commit(tmp_path):
    if environment.git_state()["commit"] is not None:  # a git checkout: the commit is HEAD's
        head = subprocess.run(["git", "-C", str(environment.REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
        assert environment.git_state()["commit"] == head
    assert environment.git_state(tmp_path) == {"commit": None, "dirty": None}  # no .git: an installed copy


def test_record_appends_one_entry_per_start_and_keeps_an_unreadable_file(tmp_path):
    environment.record(tmp_path, {"n": 1})
    environment.record(tmp_path, {"n": 2})
    assert json.loads((tmp_path / "environment.json").read_text()) == {"starts": [{"n": 1}, {"n": 2}]}
    (tmp_path / "environment.json").write_text("{not json")
    environment.record(tmp_path, {"n": 3})
    doc = json.loads((tmp_path / "environment.json").read_text())
    assert doc["starts"] == [{"n": 3}] and doc["unreadable"] == "{not json"
    assert not list(tmp_path.glob("*.tmp"))

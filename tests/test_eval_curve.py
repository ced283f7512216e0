"""Evaluation curves (``eval_curve_steps``): the final evaluation's protocol at intermediate steps of one run.

What is checked: a run with a curve trains exactly as one without (same losses, same final ``eval.json``); each point
is written with its step and a training clock that grows; the last point is the final evaluation; the base images
are generated once per run; bad steps are refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import ENV, REPO, SCRIPT, losses

from diffalign.config import TrainConfig
from diffalign.errors import ConfigError


def _sandbox_args(out, cache, *extra):
    return [
        "--output_dir", str(out), "--cache_dir", str(cache), "--max_train_steps", "4", "--max_train_samples", "128",
        "--checkpointing_steps", "0", "--validation_steps", "0", "--report_to", "none", "--logging_steps", "1",
        "--eval_num_prompts", "6", "--eval_seeds", "[0]", "--eval_steps", "4", *extra,
    ]  # fmt: skip


def _run(args):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"


def test_curve_points_do_not_change_training_and_end_with_the_final_evaluation(tmp_path):
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    _run(_sandbox_args(plain, tmp_path / "cache"))
    _run(_sandbox_args(curved, tmp_path / "cache", "--eval_curve_steps", "[2]"))
    assert losses(plain) == losses(curved)
    final_plain = json.loads((plain / "eval.json").read_text())
    final_curved = json.loads((curved / "eval.json").read_text())
    assert final_plain["win_rate"] == final_curved["win_rate"]
    assert not (plain / "eval_curve.jsonl").exists()

    points = [json.loads(x) for x in (curved / "eval_curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4]
    assert 0 < points[0]["train_seconds"] < points[1]["train_seconds"]
    assert points[1]["win_rate"] == final_curved["win_rate"]["win_rate"]
    assert points[1]["ci95"] == [final_curved["win_rate"]["ci_low"], final_curved["win_rate"]["ci_high"]]
    mid = json.loads((curved / "eval_curve" / "step-2" / "eval.json").read_text())
    assert mid["win_rate"]["win_rate"] == points[0]["win_rate"]
    assert points[0]["aligned_means"]["overall"] == mid["aspects"]["overall"]["aligned"]["mean"]
    # the same base images on both points (generated once, then reused)
    assert mid["aspects"]["overall"]["base"] == final_curved["aspects"]["overall"]["base"]


def test_base_images_are_generated_once_per_run(monkeypatch, tmp_path):
    from diffalign.eval import protocol

    calls = []

    def fake_generate(pipe, prompts, seeds, **kw):
        calls.append(kw["desc"])
        shade = 0 if kw["desc"] == "eval base" else 255
        return np.full((len(prompts), 8, 8, 3), shade, dtype=np.uint8)

    monkeypatch.setattr(protocol, "generate", fake_generate)
    score = lambda images, prompts: {"overall": images.reshape(len(images), -1).mean(1) / 255.0}  # noqa: E731
    monkeypatch.setattr(protocol, "reward_score_fn", lambda name: score)
    cache: dict = {}
    kw = dict(base_context=contextlib.nullcontext(), dataset="sandbox", split="test_unique", num_prompts=None,
              seeds=[0, 1], steps=4, guidance=5.0, reward="x", batch_size=8, prompts=["a", "b", "c"])  # fmt: skip
    for i in range(3):
        result = protocol.evaluate_pipeline_pair(None, output_dir=tmp_path / str(i), base_images=cache, **kw)
        assert result["win_rate"]["win_rate"] == 1.0
    assert calls == ["eval base", "eval aligned", "eval aligned", "eval aligned"]
    # another seed list is another set of base images
    protocol.evaluate_pipeline_pair(
        None, output_dir=tmp_path / "s", base_images=cache, **{**kw, "seeds": [3]}
    )
    assert calls[-2:] == ["eval base", "eval aligned"]
    # without a cache (the plain final evaluation) nothing is kept
    protocol.evaluate_pipeline_pair(None, output_dir=tmp_path / "n", **kw)
    assert calls[-2:] == ["eval base", "eval aligned"]


@pytest.mark.parametrize("steps", [[0], [700], [-5]])
def test_curve_steps_outside_the_run_are_refused(steps):
    with pytest.raises(ConfigError, match=r"eval_curve_steps .* max_train_steps=600"):
        TrainConfig(max_train_steps=600, eval_curve_steps=steps)

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


def _curve(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"step": s, "train_seconds": sec, "win_rate": w, "ci95": [w - 0.07, w + 0.07]}) + "\n"
            for s, sec, w in points
        )
    )
    return path


def test_curves_summarise_over_seeds_and_plot(tmp_path):
    from diffalign.eval.multi_seed import format_curve, summarise_curves

    dpo = summarise_curves(
        {
            0: _curve(tmp_path / "d0.jsonl", [(150, 60.0, 0.52), (600, 240.0, 0.64)]),
            1: _curve(tmp_path / "d1.jsonl", [(150, 62.0, 0.48), (600, 250.0, 0.60)]),
            2: tmp_path / "missing.jsonl",
        }
    )
    assert [c["step"] for c in dpo] == [150, 600] and dpo[0]["num_seeds"] == 2
    assert dpo[1]["mean_win_rate"] == pytest.approx(0.62) and dpo[1]["min_win_rate"] == 0.60
    assert dpo[0]["mean_train_seconds"] == pytest.approx(61.0)
    assert dpo[1]["min_ci_low"] == pytest.approx(0.53)
    assert "| 600 | 0.620 | 0.600 | 0.640 | 0.530 | 245 | 2 |" in format_curve(dpo)
    fast = summarise_curves({0: _curve(tmp_path / "f0.jsonl", [(150, 90.0, 0.63), (600, 360.0, 0.70)])})
    slow = summarise_curves({0: _curve(tmp_path / "s0.jsonl", [(150, 90.0, 0.55), (600, 360.0, 0.58)])})
    files = {}
    for name, curve in {"dpo": dpo, "fast": fast, "slow": slow}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({"curve": curve}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_curves.py"), "--runs",
         *(f"{k}={v}" for k, v in files.items()), "--out", str(tmp_path / "fig.png")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "fig.json").read_text())
    assert summary["baseline_final_mean_win_rate"] == pytest.approx(0.62)
    assert summary["first_step_reaching_baseline_final"] == {"dpo": 600, "fast": 150, "slow": None}
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_curves.py"), "--runs", f"x={tmp_path}/no.json"],
                         env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "x: " in bad.stderr and "does not exist" in bad.stderr


def test_seed_batches_merge_to_the_summary_of_all_seeds(tmp_path):
    """Seeds 0-2 run first and 3-4 later (two directories) summarise, merged, exactly as all five run together;
    the script's --merge writes it without training, and a seed in two batches is refused."""
    from diffalign.eval.multi_seed import merge_summaries, summarise_curves, summarise_seeds

    rates = {0: 0.57, 1: 0.545, 2: 0.605, 3: 0.44, 4: 0.4725}
    evals, curves = {}, {}
    for s, r in rates.items():
        evals[s] = tmp_path / f"e{s}.json"
        evals[s].write_text(json.dumps({"win_rate": {"win_rate": r, "ci_low": r - 0.07, "ci_high": r + 0.07,
                                                     "wins": 1, "ties": 0, "losses": 1}, "aspects": {}}))  # fmt: skip
        curves[s] = _curve(tmp_path / f"c{s}.jsonl", [(150, 100.0 + s, r - 0.05), (600, 400.0 + s, r)])

    def summary(seeds):  # what scripts/multi_seed.py writes for a batch, through its JSON file
        out = summarise_seeds({s: evals[s] for s in seeds})
        out["curve"] = summarise_curves({s: curves[s] for s in seeds})
        return json.loads(json.dumps(out))

    merged = merge_summaries([summary([3, 4]), summary([0, 1, 2])], sources=["b.json", "a.json"])
    assert {k: v for k, v in merged.items() if k != "merged_from"} == summary([0, 1, 2, 3, 4])
    assert list(merged["seeds"]) == ["0", "1", "2", "3", "4"] and merged["merged_from"] == [
        "b.json",
        "a.json",
    ]
    assert merged["mean_win_rate"] == pytest.approx(2.6325 / 5) and merged["min_ci_low"] == pytest.approx(
        0.37
    )
    assert merged["curve"][0]["mean_train_seconds"] == pytest.approx(102.0)
    with pytest.raises(ValueError, match="seed 2 is in two of the summaries to merge \\(c.json\\)"):
        merge_summaries([summary([0, 1, 2]), summary([2, 3])], sources=["a.json", "c.json"])

    files = []
    for name, seeds in (("a", [0, 1, 2]), ("b", [3, 4])):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(
            json.dumps({**summary(seeds), "config": "configs/sandbox_inpo.yaml", "extra_flags": []})
        )
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "multi_seed.py"), "--merge", *map(str, files),
                           "--output_dir", str(tmp_path / "ab")], env=ENV, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = json.loads((tmp_path / "ab" / "multi_seed.json").read_text())
    assert written["num_seeds"] == 5 and written["config"] == "configs/sandbox_inpo.yaml"
    assert written["mean_win_rate"] == pytest.approx(merged["mean_win_rate"])
    assert "mean 0.527 over 5 seeds (min 0.440, max 0.605" in (tmp_path / "ab" / "multi_seed.md").read_text()
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "multi_seed.py"), "--merge", str(files[0])],
                         env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "--merge needs --output_dir" in bad.stderr

"""End to end on the sandbox subjects: scripts/train_subjects.py (RPO with checkpoint selection by λ, DreamBooth with
prior preservation) writes one model per subject where scripts/benchmark_dreambench.py reads it, and the models
draw the subject, which the base cannot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "redyellow_split_circle"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("subjects")
    common = ["--subject_subjects", SUBJECT, "--max_train_steps", "80", "--report_to", "none",
              "--subject_eval_images_per_prompt", "2"]  # fmt: skip
    train = _script("train_subjects").main
    rpo = train(
        ["--config", str(ROOT / "configs/sandbox_rpo.yaml"), *common, "--subject_output_dir", str(out / "rpo"),
         "--subject_select_every", "40"]
    )  # fmt: skip
    db = train(
        ["--config", str(ROOT / "configs/sandbox_dreambooth.yaml"), *common, "--subject_output_dir", str(out / "db")]
    )  # fmt: skip
    return out, rpo, db


def _means(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())["mean"]


def test_rpo_pairs_selection_and_outputs(trained):
    out, rpo, _ = trained
    info = rpo["subjects"][SUBJECT]
    pairs = pq.read_table(out / "rpo" / "runs" / SUBJECT / "pairs" / "data" / "train-00000-of-00001.parquet")
    rows = pairs.to_pydict()
    assert len(rows["caption"]) == 32 and set(rows["caption"]) == {"a sks circle"}
    assert len(set(rows["caption_1"])) == 8 and all("sks circle" in c for c in rows["caption_1"])
    assert all(abs(a + b - 1.0) < 1e-12 and 0 < a < 1 for a, b in zip(rows["label_0"], rows["label_1"]))
    assert [c["step"] for c in info["candidates"]] == [40, 80]
    for lam in ("0.3", "0.5", "0.7"):
        sel = json.loads((out / "rpo" / f"lambda-{lam}" / SUBJECT / "selection.json").read_text())
        scores = {s["step"]: s["harmonic"][lam] for s in sel["scores"]}
        assert sel["step"] == max(scores, key=scores.get)  # the best candidate for this λ
        assert (out / "rpo" / f"lambda-{lam}" / SUBJECT / "pytorch_lora_weights.safetensors").is_file()
        # the run ends with the DreamBench protocol and the common eval.json (win rate over the base, Wilson CI)
        ev = json.loads((out / "rpo" / f"lambda-{lam}" / "eval.json").read_text())
        w = ev["win_rate"]
        assert ev["num_prompts"] == 14 and ev["seeds_per_prompt"] == 2
        assert w["wins"] + w["ties"] + w["losses"] == 14 and w["ci_low"] <= w["win_rate"] <= w["ci_high"]
        assert set(ev["aspects"]) >= {
            "dino",
            "clip_i",
            "clip_t",
            "harmonic",
            "judge_context",
            "subject_match",
        }
    # the DreamBooth data: class images with the class prompt, decided labels
    rows = pq.read_table(
        out / "db" / "runs" / SUBJECT / "pairs" / "data" / "train-00000-of-00001.parquet"
    ).to_pydict()
    assert set(rows["caption_1"]) == {"a circle"} and set(rows["label_0"]) == {1.0}
    assert (out / "db" / "eval.json").is_file()


def test_subject_models_draw_the_subject(trained):
    """The effect: after 80 steps both methods draw the two-tone subject far more often than the base (which
    cannot: no caption names two colours), measured by the DreamBench protocol on the held-out prompts."""
    out, _, _ = trained
    base = _means(out / "rpo" / "eval" / "base")
    rpo = _means(out / "rpo" / "eval" / "lambda-0.5")
    db = _means(out / "db" / "eval" / "db")
    assert base == _means(out / "db" / "eval" / "base")  # same prompts and seeds on every side
    assert base["subject_match"] < 0.1
    assert rpo["subject_match"] > base["subject_match"] + 0.1, (base, rpo)
    assert db["subject_match"] > base["subject_match"] + 0.1, (base, db)
    assert rpo["clip_i"] > base["clip_i"] and db["clip_i"] > base["clip_i"]


def test_bad_subject_flag_is_one_line(tmp_path):
    from diffalign.errors import ConfigError

    with pytest.raises(ConfigError, match="subject_select_everyy"):
        _script("train_subjects").main(
            ["--subject_select_everyy", "3", "--subject_output_dir", str(tmp_path)]
        )


def test_a_mistyped_training_flag_is_refused_before_the_base_model_draws(tmp_path, monkeypatch):
    """The training flags are parsed before the slow part (loading the base, drawing each subject's images): a typo
    fails at once instead of after the first subject's pairs are built."""
    from diffalign.errors import ConfigError
    from diffalign.eval import benchmark_models

    def refuse(*args, **kwargs):
        raise AssertionError("the base pipeline was loaded before the flags were checked")

    monkeypatch.setattr(benchmark_models, "load_base_pipeline", refuse)
    with pytest.raises(ConfigError, match="'learning_rte' is not a field"):
        _script("train_subjects").main(["--learning_rte", "1e-4", "--subject_output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="config field subject_clip: unknown reward 'no-such-clip'"):
        _script("train_subjects").main(
            ["--subject_clip", "no-such-clip", "--subject_output_dir", str(tmp_path)]
        )
    weights = {"model": {"path": "weights/absent", "source": "nowhere"}}
    manifest = tmp_path / "absent-dino.yaml"
    manifest.write_text(json.dumps({"name": "absent-dino", "kind": "image_features", "weights": weights}))
    argv = ["--subject_dino", str(manifest), "--subject_output_dir", str(tmp_path)]
    with pytest.raises(
        FileNotFoundError, match="config field subject_dino: reward 'absent-dino': weights 'model'"
    ):
        _script("train_subjects").main(argv)
    with pytest.raises(ConfigError, match="subject_select_every must be >= 0, got -1"):
        _script("train_subjects").main(
            ["--subject_select_every", "-1", "--subject_output_dir", str(tmp_path)]
        )


def test_non_subject_objective_is_refused(tmp_path):
    from diffalign.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"subject-driven objectives \(\['dreambooth', 'dreambooth_prior', 'rpo'\]\)"
    ):
        _script("train_subjects").main(["--objective", "dpo", "--subject_output_dir", str(tmp_path)])

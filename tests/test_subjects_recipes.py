"""The SD1.5 / SD2.1 / SDXL subject-driven recipes run as written on the real DreamBench layout (the 3-subject subset
in ../shared/data), with only the model swapped for a tiny random pipeline and the sizes shrunk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny_sd, build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "dreambench-mini"


def _train_subjects():
    spec = importlib.util.spec_from_file_location("train_subjects", ROOT / "scripts" / "train_subjects.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"sd": build_tiny_sd(root / "sd"), "sdxl": build_tiny_sdxl(root / "sdxl")}


@pytest.mark.skipif(not MINI.is_dir(), reason=f"the DreamBench subset {MINI} is absent (../shared/data)")
@pytest.mark.parametrize(
    "recipe, model",
    [("sd15_rpo", "sd"), ("sd21_rpo", "sd"), ("sdxl_rpo", "sdxl"), ("sd21_dreambooth", "sd")],
)
def test_recipe_runs_on_dreambench_layout(recipe, model, tiny, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())
    first = (ROOT / "configs" / f"{recipe}.yaml").read_text().splitlines()[2]
    assert f"scripts/train_subjects.py --config configs/{recipe}.yaml" in first  # headed by its command
    select = ["--subject_select_every", "1"] if cfg["subject_select_every"] else []
    summary = _train_subjects()(
        [
            "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
            "--subject_data", str(MINI), "--subject_subjects", "vase", "--subject_output_dir", str(tmp_path),
            "--subject_num_generated", "1", "--subject_steps", "2", "--subject_select_seeds", "0",
            "--subject_clip", "sandbox-clip", "--subject_dino", "sandbox-dino-standin",
            "--subject_eval_images_per_prompt", "1", *select,
            "--pretrained_model", str(tiny[model]), "--resolution", "16", "--max_train_steps", "2",
            "--mixed_precision", "no", "--report_to", "none",
        ]
    )  # fmt: skip
    info = summary["subjects"]["vase"]
    assert info["pairs"]["num_pairs"] == 8  # the official 8 context prompts (no training_prompts.txt here)
    assert [c["step"] for c in info["candidates"]] == ([1, 2] if select else [2])
    dest = tmp_path / ("lambda-0.5" if select else "") / "vase"
    from diffalign.eval.benchmark_models import resolve_variant

    assert resolve_variant(dest).kind == ("unet" if cfg["finetune"] == "full" else "lora")
    ev = json.loads((dest.parent / "eval.json").read_text())  # the DreamBench protocol ran on the real layout
    assert ev["num_prompts"] == 25 and ev["seeds_per_prompt"] == 1


@pytest.mark.skipif(not MINI.is_dir(), reason=f"the DreamBench subset {MINI} is absent (../shared/data)")
def test_rerun_in_the_same_directory_trains_afresh(tiny, tmp_path):
    """A second run into the same output directory must not resume from the first run's checkpoints (a longer
    earlier run's checkpoint-4 would otherwise be taken for the latest one after step 1)."""
    import hashlib

    def run(steps: int) -> dict:
        return _train_subjects()(
            [
                "--config", str(ROOT / "configs" / "sd15_rpo.yaml"), "--subject_data", str(MINI),
                "--subject_subjects", "vase", "--subject_output_dir", str(tmp_path), "--subject_num_generated", "1",
                "--subject_steps", "2", "--subject_select_seeds", "0", "--subject_clip", "sandbox-clip",
                "--subject_select_every", "1", "--subject_eval", "false", "--pretrained_model", str(tiny["sd"]),
                "--resolution", "16", "--max_train_steps", str(steps), "--mixed_precision", "no",
                "--learning_rate", "1e-3", "--report_to", "none",
            ]
        )["subjects"]["vase"]["candidates"]  # fmt: skip

    def digest(c: dict) -> str:
        return hashlib.sha256(
            (Path(c["weights"]) / "diffusion_pytorch_model.safetensors").read_bytes()
        ).hexdigest()

    first = {c["step"]: digest(c) for c in run(4)}
    second = {c["step"]: digest(c) for c in run(2)}
    assert list(second) == [1, 2]
    assert second[1] == first[1] and second[2] == first[2]  # the same fresh run, not a resumed stale one

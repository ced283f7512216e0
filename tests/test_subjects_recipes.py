"""The SD1.5 / SD2.1 / SDXL subject-driven recipes run as written on the real DreamBench layout (the 3-subject subset
in ../shared/data), with only the model swapped for a tiny random pipeline and the sizes shrunk."""

from __future__ import annotations

import importlib.util
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
            "--subject_clip", "sandbox-clip", *select,
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

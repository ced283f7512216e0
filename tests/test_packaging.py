"""A non-editable install runs on its own: the wheel holds every file diffalign reads at run time.

The wheel is built the way ``pip install .`` builds it (``pip wheel --no-deps --no-build-isolation``, from a copy of
the files the build reads, so that concurrent runs and a stale ``build/`` folder in the checkout cannot interfere),
unpacked, and used from a fresh interpreter started outside the checkout with only the unpacked wheel on
``PYTHONPATH`` (dependencies from this environment; the editable install's import hook is switched off). That
interpreter loads the sandbox pipeline, the default evaluation's judge and every sandbox entry of the reward catalog,
runs the main command (``scripts/train_diffusion_dpo.py``, a few steps) and the load snippet of the model card it
writes, and finally checks that no module and no data file came from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the build reads; reward_models/weights holds downloaded real-model weights and never ships.
BUILD_INPUTS = ("pyproject.toml", "README.md", "diffalign", "reward_models")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "weights")

# Run-time files the wheel must hold (a sample: each folder's loader needs the rest of it too, checked by using it).
REQUIRED = [
    "diffalign/sandbox/assets/pipeline/model_index.json",
    "diffalign/sandbox/assets/pipeline/unet/diffusion_pytorch_model.safetensors",
    "diffalign/sandbox/assets/pipeline/text_encoder/model.safetensors",
    "diffalign/sandbox/assets/pipeline/tokenizer/vocab.json",
    "diffalign/sandbox/assets/unet-early/config.json",
    "diffalign/reward_models/sandbox-judge.yaml",
    "diffalign/reward_models/sandbox-clip.yaml",
    "diffalign/reward_models/sandbox-clip/model.safetensors",
    "diffalign/reward_models/sandbox-vp-score/heads.safetensors",
    "diffalign/reward_models/pickscore.yaml",
]
MAX_WHEEL_MB = 40  # the sandbox models and data are tiny; more means something large slipped in

SANDBOX_REWARDS = {
    "sandbox-judge",
    "sandbox-clip",
    "sandbox-vp-score",
    "sandbox-dino-standin",
    "combined-sandbox",
}

CHECK = textwrap.dedent(
    """
    import json, runpy, sys
    from pathlib import Path

    # The editable install of this environment would answer for any diffalign module the wheel lacks: switch it off.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    site, repo, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    import numpy as np
    import diffalign
    from diffalign.sandbox import REWARD_MODELS_DIR, SANDBOX_CLIP, SANDBOX_DATA, SANDBOX_PIPELINE
    for path in (Path(diffalign.__file__), REWARD_MODELS_DIR, SANDBOX_CLIP, SANDBOX_DATA, SANDBOX_PIPELINE):
        assert path.is_relative_to(site) and path.exists(), f"{path}: missing, or not inside the unpacked wheel {site}"

    # The sandbox pipeline, as training and the demo load it, and one image from it.
    from diffusers import StableDiffusionPipeline
    from diffalign.models.pipeline import load_components, resolve_model_path
    comps = load_components("sandbox")
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("sandbox"))
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle on the left on a white background"
    images = (pipe(prompt, num_inference_steps=2, output_type="np").images * 255).round().astype(np.uint8)
    assert images.shape == (1, 32, 32, 3), images.shape

    # The default evaluation's reward, and every sandbox entry of the reward catalog.
    from diffalign.eval.protocol import reward_score_fn, split_prompts
    assert set(reward_score_fn("sandbox-judge")(images, [prompt])) >= {"overall", "prompt_following"}
    from diffalign.rewards.catalog import CATALOG_DIR, list_rewards, load_manifest, load_reward, resolve_weights
    assert CATALOG_DIR.is_relative_to(site), CATALOG_DIR
    names = {n for n in list_rewards() if "sandbox" in n}
    assert names >= set(sys.argv[4].split(",")), names
    for name in sorted(names):
        for key, path in resolve_weights(load_manifest(name)).items():
            assert path.resolve().is_relative_to(site), (name, key, path)
        reward = load_reward(name)
        if hasattr(reward, "score"):  # image_features entries (DreamBench backbones) only embed
            assert reward.score(images, [prompt]).shape == (1,), name
    assert len(split_prompts("sandbox", "test_unique", 2)) == 2

    # The main command (a few steps), then the load snippet of the model card it wrote.
    sys.argv = [str(out.parent / "scripts" / "train_diffusion_dpo.py"), *json.loads(sys.argv[5])]
    runpy.run_path(sys.argv[0], run_name="__main__")
    card = (out / "README.md").read_text()
    snippet = card.split("```python\\n", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "model card", "exec"), {"__name__": "__main__"})
    assert json.loads((out / "eval.json").read_text())["win_rate"]["n"] == 2

    env = Path(sys.prefix).resolve()  # this environment may live inside the checkout (.venv): not the checkout's code
    files = {name: Path(mod.__file__).resolve() for name, mod in list(sys.modules.items()) if getattr(mod, "__file__", None)}
    from_repo = sorted(n for n, f in files.items() if f.is_relative_to(repo) and not f.is_relative_to(env))
    assert not from_repo, f"imported from the checkout: {from_repo}"
    print("WHEEL RUNS")
    """
)

MAIN_ARGS = [
    "--max_train_steps", "2", "--max_train_samples", "16", "--train_batch_size", "4",
    "--checkpointing_steps", "0", "--validation_steps", "0", "--report_to", "none", "--use_cache", "false",
    "--eval_num_prompts", "2", "--eval_seeds", "0", "--eval_steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(
                path, src / name, symlinks=True, ignore=SKIP
            )  # diffalign/reward_models stays a link
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (whl,) = dist.glob("diffalign-*.whl")
    return whl


def test_wheel_holds_the_run_time_files_and_nothing_large(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not [n for n in names if "/weights/" in n], "downloaded reward weights must not ship"
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "diffalign").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "a subpackage is missing from the wheel"
    assert wheel.stat().st_size < MAX_WHEEL_MB * 2**20, f"{wheel.stat().st_size / 2**20:.1f} MB"


def test_unpacked_wheel_runs_the_sandbox_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = tmp_path / "run"
    (run / "scripts").mkdir(parents=True)
    (run / "configs").mkdir()
    shutil.copy2(REPO / "scripts" / "train_diffusion_dpo.py", run / "scripts")
    shutil.copy2(REPO / "configs" / "sandbox_dpo.yaml", run / "configs")  # the script's default config
    out = run / "out"
    args = [*MAIN_ARGS, "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFALIGN_REWARD_WEIGHTS", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(site), str(REPO), str(out), ",".join(sorted(SANDBOX_REWARDS)),
         json.dumps(args)],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0 and "WHEEL RUNS" in proc.stdout, (
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )

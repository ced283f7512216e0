"""Code in documentation runs as written: the model card's load snippet (LoRA and full fine-tuning exports of the
sandbox model) and the Python blocks of the top-level README, each executed verbatim in a fresh interpreter whose
working directory is elsewhere, so relative paths and names only diffalign resolves (``"sandbox"``) fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from diffalign.config import DPOConfig
from diffalign.training.model_card import write_model_card

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return PYTHON_BLOCK.findall(markdown)


def run_blocks(
    blocks: list[str], cwd: Path, check: str = "", timeout: int = 600
) -> subprocess.CompletedProcess:
    """Exec ``blocks`` verbatim, one after the other in one namespace, in a new interpreter started in ``cwd``;
    then ``check`` (test code) in the same namespace. Fails the test with the interpreter's output on error."""
    program = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, {tests!r})  # tiny_models, for the checks only
        blocks, check = json.load(sys.stdin)
        ns = {{"__name__": "__main__"}}
        for i, block in enumerate(blocks):
            exec(compile(block, f"<python block {{i}}>", "exec"), ns)
        exec(compile(check, "<check>", "exec"), ns)
        print("BLOCKS RAN")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", program.format(tests=str(TESTS))],
        input=json.dumps([blocks, check]),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 and "BLOCKS RAN" in proc.stdout, (
        f"the blocks did not run:\n{''.join(blocks)}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-3000:]}"
    )
    return proc


def test_python_blocks_are_found_verbatim():
    text = "x\n```python\na = 1\n\nb = 2\n```\n```bash\nls\n```\n```python\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\n\nb = 2\n", "c = 3\n"]


# ---------------------------------------------------------------------------------------------------------------
# The model card


def _sandbox_unet():
    from diffusers import UNet2DConditionModel

    from diffalign.models.pipeline import resolve_model_path

    return UNet2DConditionModel.from_pretrained(resolve_model_path("sandbox"), subfolder="unet")


def _export_visible_lora(lora_dir: Path, seed: int) -> str:
    """Export a sandbox LoRA with nonzero ``lora_B`` (so that loading it is visible) to ``lora_dir``; return the
    check code that a snippet's ``pipe`` holds every one of its tensors and drew a 32 px ``image``."""
    from diffalign.models.lora import add_lora, save_lora

    unet = _sandbox_unet()
    add_lora(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    save_lora(lora_dir, unet)
    count = sum("lora_" in n for n, _ in unet.named_parameters())
    return f"""
from tiny_models import assert_lora_fully_loaded
assert assert_lora_fully_loaded(pipe, {str(lora_dir)!r}) == {count}
assert image.size == (32, 32)
"""


def test_model_card_snippet_loads_a_sandbox_lora_as_written(tmp_path):
    out = tmp_path / "run"
    check = _export_visible_lora(out / "lora", seed=0)
    cfg = DPOConfig(output_dir=str(out), finetune="lora", eval_steps=2)
    card = write_model_card(out, cfg, {"dataset": "sandbox"}, {"eval": None}, out / "lora").read_text()

    blocks = python_blocks(card)
    assert len(blocks) == 1 and '"sandbox"' not in blocks[0] and "load_lora_weights" in blocks[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_blocks(blocks, elsewhere, check)


def test_model_card_snippet_loads_a_full_fine_tune_as_written(tmp_path):
    unet = _sandbox_unet()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)  # a stand-in for full fine-tuning
    out = tmp_path / "run"
    unet.save_pretrained(out / "unet", safe_serialization=True)
    cfg = DPOConfig(output_dir=str(out), finetune="full", eval_steps=2)
    card = write_model_card(out, cfg, {}, {}, out / "unet").read_text()

    blocks = python_blocks(card)
    assert len(blocks) == 1 and "UNet2DConditionModel.from_pretrained" in blocks[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = f"""
import torch
from safetensors.torch import load_file
saved = load_file({str(out / "unet" / "diffusion_pytorch_model.safetensors")!r})
loaded = pipe.unet.state_dict()
assert saved.keys() == loaded.keys()
assert all(torch.equal(loaded[k], v) for k, v in saved.items()), "the pipeline does not hold the exported UNet"
assert image.size == (32, 32)
"""
    run_blocks(blocks, elsewhere, check)


def test_model_card_names_local_base_models_absolutely_and_hub_ids_as_given(tmp_path, monkeypatch):
    from diffalign.training.model_card import load_snippet

    (tmp_path / "models" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = load_snippet(DPOConfig(pretrained_model="models/sd15"), Path("out/lora"))
    assert repr(str(tmp_path / "models" / "sd15")) in local and repr(str(tmp_path / "out" / "lora")) in local
    hub = load_snippet(
        DPOConfig(pretrained_model="org/model", finetune="full", variant="fp16"), tmp_path / "unet"
    )
    assert "DiffusionPipeline.from_pretrained('org/model', variant='fp16', unet=unet)" in hub


# ---------------------------------------------------------------------------------------------------------------
# The README


def test_readme_python_blocks_run_as_written(tmp_path):
    """The README's snippet loads what the main command exports (``outputs/dpo-sandbox/lora``, relative to where it
    runs): an exported LoRA with nonzero weights is put there, in a directory outside the repository, and the
    snippet must load every tensor of it into a stock pipeline and draw an image."""
    from diffalign.config import TrainConfig

    blocks = python_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md lost its Python snippet (loading the main command's LoRA)"
    main_out = Path(TrainConfig().output_dir) / "lora"
    assert any(str(main_out) in b for b in blocks), f"the README's snippet no longer loads {main_out}"

    check = _export_visible_lora(tmp_path / main_out, seed=2)
    run_blocks(blocks, tmp_path, check)  # the snippet finds the LoRA by its relative path


def test_model_card_marks_null_control_runs(tmp_path):
    from diffalign.config import OnlineConfig

    coin = tmp_path / "coin-data"
    coin.mkdir()
    (coin / "label_control.json").write_text("{}")
    cases = {
        "coin": (DPOConfig(dataset=str(coin)), "flipped by a fair coin"),
        "permute": (OnlineConfig(reward_control="permute"), "`reward_control: permute`"),
        "random": (OnlineConfig(reward="sandbox-random-control"), "`sandbox-random-control`"),
        "real": (DPOConfig(), None),
        "online": (OnlineConfig(), None),
    }
    for name, (cfg, needle) in cases.items():
        out = tmp_path / name
        out.mkdir()
        card = write_model_card(out, cfg, {}, {}, out / "lora").read_text()
        assert ("Null control, not an aligned model" in card) == (needle is not None), name
        if needle:
            assert needle in card, name

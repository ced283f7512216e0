"""The online loop (scripts/train_online.py) on real model shapes: tiny random SD1.x and SDXL pipelines (16-pixel
images, :mod:`tiny_models`) with .txt prompt files, PRDP and DDPO, LoRA and full fine-tuning, DDIM and DDPM sampling.
Two short epochs each: the run exits 0, logs two epoch rows and exports finite weights that moved from the start.
The training sampler's guided noise prediction is compared with the stock diffusers pipeline's (SD1.x and SDXL), and
the SD1.5 recipes (configs/sd15_*.yaml) are checked to hold the papers' numbers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import ENV, REPO
from safetensors.torch import load_file
from tiny_models import build_tiny_sd, build_tiny_sdxl

SCRIPT = REPO / "scripts" / "train_online.py"

TRAIN_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a small purple cross",
    "a large orange circle",
]
EVAL_PROMPTS = ["a white square", "a black triangle", "a pink star"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("online-models")
    train, held_out = root / "train.txt", root / "eval.txt"
    train.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    held_out.write_text("\n".join(EVAL_PROMPTS) + "\n")
    return {
        "sd": build_tiny_sd(root / "sd"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "prompts": train,
        "eval_prompts": held_out,
    }


def tiny_online_args(tiny, model: str, out: Path, *extra) -> list[str]:
    """Two epochs of 2 prompts x 2 images, 3 sampling steps, one prompt per micro-batch; nothing but the export."""
    return [
        "--pretrained_model", str(tiny[model]), "--resolution", "16", "--output_dir", str(out),
        "--prompts", str(tiny["prompts"]), "--eval_prompts", str(tiny["eval_prompts"]), "--eval_num_prompts", "2",
        "--reward", "sandbox-clip", "--num_epochs", "2", "--prompts_per_epoch", "2", "--images_per_prompt", "2",
        "--train_batch_size", "1", "--sample_steps", "3", "--sample_batch_size", "4", "--timestep_fraction", "1.0",
        "--checkpointing_steps", "0", "--validation_steps", "0", "--track_every", "0", "--skip_eval", "true",
        "--report_to", "none", "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--lora_target_modules", "to_q,to_k,to_v,to_out.0", *extra,
    ]  # fmt: skip


def run(args, timeout=300):
    cmd = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    )
    return proc


def epoch_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["epoch"] > 0]


def check_log(out: Path, objective: str) -> None:
    rows = epoch_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["train/loss"]) and np.isfinite(r["train/reward_mean"])
        assert any(k.startswith(f"{objective}/") for k in r), sorted(r)


def check_lora_moved(out: Path) -> None:
    """Exported LoRA: finite, and moved from the start (gaussian A, zero B: a trained B is non-zero)."""
    weights = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert b, sorted(weights)[:5]
    assert max(float(v.abs().max()) for v in b) > 0, "every LoRA B is still zero: the run did not train"


def check_full_moved(out: Path, model: Path) -> None:
    """Exported UNet (save_pretrained): finite, same tensors as the starting UNet, and different values."""
    (tuned_file,) = (out / "unet").glob("*.safetensors")
    (base_file,) = (model / "unet").glob("*.safetensors")
    tuned, base = load_file(str(tuned_file)), load_file(str(base_file))
    assert tuned.keys() == base.keys()
    assert all(torch.isfinite(v).all() for v in tuned.values())
    changed = [k for k in base if not torch.equal(tuned[k].float(), base[k].float())]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} UNet tensors changed"


CASES = {
    # name: (model, objective, extra flags)
    "sd-prdp-lora-ddim": ("sd", "prdp", []),
    "sd-ddpo-lora-ddim": ("sd", "ddpo", []),
    "sd-prdp-full-ddpm": ("sd", "prdp", ["--finetune", "full", "--sampler", "ddpm"]),
    "sd-ddpo-lora-ddpm": ("sd", "ddpo", ["--sampler", "ddpm"]),
    "sdxl-prdp-lora-ddim": ("sdxl", "prdp", []),
    "sdxl-prdp-full-ddpm": ("sdxl", "prdp", ["--finetune", "full", "--sampler", "ddpm"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_online_run_on_a_tiny_pipeline_exports_trained_weights(tiny, tmp_path, case):
    model, objective, extra = CASES[case]
    out = tmp_path / case
    proc = run(tiny_online_args(tiny, model, out, "--objective", objective, *extra))
    assert ("SDXL" if model == "sdxl" else "SD1.x") in proc.stdout
    check_log(out, objective)
    if "--finetune" in extra:
        check_full_moved(out, tiny[model])
    else:
        check_lora_moved(out)


def test_held_out_txt_prompts_are_evaluated_and_kept_out_of_training(tiny, tmp_path):
    """The final base-vs-aligned evaluation on the first eval_num_prompts of a .txt file, which are excluded from
    the training prompts (here one of them is also in the training file)."""
    out, train = tmp_path / "eval", tmp_path / "train.txt"
    train.write_text("\n".join([*TRAIN_PROMPTS, EVAL_PROMPTS[0]]) + "\n")
    args = tiny_online_args(tiny, "sd", out, "--objective", "prdp", "--prompts", str(train), "--skip_eval", "false",
                            "--eval_reward", "sandbox-clip", "--eval_steps", "3", "--eval_seeds", "0",
                            "--eval_batch_size", "4")  # fmt: skip
    proc = run(args)
    assert "excluded 1 of 2 given" in proc.stdout, proc.stdout[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["num_prompts"] == 2 and "held out from training" in result["dataset"]
    assert result["reward"] == "sandbox-clip" and np.isfinite(result["win_rate"]["win_rate"])
    check_log(out, "prdp")
    check_lora_moved(out)


def _guided_predictions(tiny, model: str, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's guided noise prediction (``OnlineTrainer._model_fn``, after a real ``setup()``) and the one the
    stock diffusers pipeline computes for the same UNet, latents, timestep, prompt and guidance (its own
    ``encode_prompt``, negative prompt None as in validation, evaluation and inference)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffalign.config import OnlineConfig, parse_config
    from diffalign.models import pipeline as mp
    from diffalign.training.online import OnlineTrainer

    cfg = parse_config(OnlineConfig, tiny_online_args(tiny, model, out, "--mixed_precision", "no"))
    trainer = OnlineTrainer(cfg)
    trainer.setup()
    unet = trainer.run.unwrapped_unet().eval()
    prompt, guidance = "a red circle", cfg.sample_guidance
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        ours = trainer._model_fn(unet, mp.encode_prompts(trainer.comps, [prompt]))(x, t)
        if model == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny[model]))
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
            ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
            u = unet(
                x, t, encoder_hidden_states=npe, added_cond_kwargs={"text_embeds": nppe, "time_ids": ids}
            ).sample
            c = unet(
                x, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": ppe, "time_ids": ids}
            ).sample
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(tiny[model]), safety_checker=None, requires_safety_checker=False
            )
            pe, npe = pipe.encode_prompt(prompt, "cpu", 1, True)
            u = unet(x, t, encoder_hidden_states=npe).sample
            c = unet(x, t, encoder_hidden_states=pe).sample
    trainer.end()
    return ours, u + guidance * (c - u)


def test_sd1_training_sampler_guides_as_the_diffusers_pipeline(tiny, tmp_path):
    ours, stock = _guided_predictions(tiny, "sd", tmp_path / "run")
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_sdxl_training_sampler_guides_as_the_diffusers_pipeline(tiny, tmp_path):
    ours, stock = _guided_predictions(tiny, "sdxl", tmp_path / "run")
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


# ---- the SD1.5 recipes ----------------------------------------------------------------------------------------------

RECIPES = {
    "sd15_prdp_small.yaml": dict(objective="prdp", beta=3e-5, clip_range=1e-6, learning_rate=1e-5, num_epochs=100,
                                 updates_per_epoch=10, prompts_per_epoch=32, images_per_prompt=16, finetune="full",
                                 sampler="ddpm", reward="hpsv2"),
    "sd15_prdp_large.yaml": dict(objective="prdp", beta=3e-6, clip_range=1e-4, learning_rate=7e-6, num_epochs=1000,
                                 updates_per_epoch=1, prompts_per_epoch=64, images_per_prompt=8, finetune="full",
                                 sampler="ddpm", reward="hpsv2"),
    "sd15_prdp_multireward.yaml": dict(objective="prdp", beta=3e-5, clip_range=1e-4, learning_rate=1e-5,
                                       num_epochs=1000, updates_per_epoch=1, prompts_per_epoch=64,
                                       images_per_prompt=8, finetune="full", sampler="ddpm"),
    "sd15_ddpo.yaml": dict(objective="ddpo", clip_range=1e-4, adv_clip_max=5.0, learning_rate=3e-4, finetune="lora",
                           sampler="ddim", sample_eta=1.0, stat_buffer_size=16, stat_min_count=16,
                           per_prompt_stat_tracking=True, reward="hpsv2"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RECIPES))
def test_sd15_recipes_hold_the_papers_numbers(name):
    from diffalign.config import OnlineConfig, parse_config

    path = REPO / "configs" / name
    cfg = parse_config(OnlineConfig, ["--config", str(path)])
    assert (
        path.read_text().startswith("# accelerate launch") and "scripts/train_online.py" in path.read_text()
    )
    assert cfg.resolution == 512 and cfg.pretrained_model == "runwayml/stable-diffusion-v1-5"
    assert cfg.sample_steps == 50 and cfg.sample_guidance == 5.0 and cfg.max_grad_norm == 1.0
    assert cfg.adam_weight_decay == 1e-4 and cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    for field, value in RECIPES[name].items():
        assert getattr(cfg, field) == value, (field, getattr(cfg, field), value)
    # one optimizer step per pass over the epoch's samples on one GPU (PRDP: K steps per epoch)
    if cfg.objective == "prdp":
        micro_batches = cfg.prompts_per_epoch // cfg.train_batch_size
        assert micro_batches == cfg.gradient_accumulation_steps


def test_multireward_recipe_weights_pickscore_on_the_papers_scale():
    """Table 4's 10·PickScore is on the cosine scale; the catalog's pickscore is ~100·cos, so the weight is 0.1."""
    from diffalign.config import OnlineConfig, parse_config

    cfg = parse_config(OnlineConfig, ["--config", str(REPO / "configs" / "sd15_prdp_multireward.yaml")])
    weights = {n: float(w) for n, w in (p.split(":") for p in cfg.reward.split(","))}
    assert weights == {"pickscore": 0.1, "hpsv2": 2.0, "aesthetic": 0.05}

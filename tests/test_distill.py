"""The distilled 4-step sandbox model (``diffalign/sandbox/distill.py``, ``scripts/distill_sandbox.py``): the quick
build writes a loadable model; ``"sandbox-4step"`` is a pipeline directory stock diffusers loads offline; the shipped
scheduler visits SDXL-Turbo's timesteps; and the shipped model, unguided at 4 steps, follows prompts clearly better
than the base at 4 steps and about as well as the base at its 20-step guided evaluation setting."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.models.pipeline import load_components, resolve_model_path
from diffalign.sandbox import SANDBOX_DISTILLED, SANDBOX_PIPELINE
from diffalign.sandbox.distill import (
    GRID,
    SCHEDULER_CLASS,
    DistillConfig,
    encode_text,
    grammar_prompts,
    guided_ode,
    materialise_pipeline,
    teacher_data,
    trailing_timesteps,
)

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("distill_sandbox", REPO / "scripts" / "distill_sandbox.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pipeline(path, **kw):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_trailing_grid_and_config_checks():
    assert trailing_timesteps(4) == list(GRID) == [999, 749, 499, 249]
    assert set(GRID) <= set(trailing_timesteps(20))
    with pytest.raises(ValueError, match="teacher_steps=10"):
        DistillConfig(teacher_steps=10)  # 999, 899, ..., 99 misses 749 and 249


def test_defaults_are_the_shipped_build():
    """No arguments rebuild the shipped UNet: the "endpoint" recipe at its measured settings (the shipped report was
    written before ``recipe`` existed; its ``p_trajectory`` 0.5 is ``1 − p_renoised``)."""
    cfg = DistillConfig()
    assert (cfg.recipe, cfg.train_steps, cfg.lr) == ("endpoint", 600, 1e-4)
    assert (DistillConfig(recipe="rerun").train_steps, DistillConfig(recipe="rerun").lr) == (1200, 2e-4)
    shipped = json.loads((SANDBOX_DISTILLED / "distill_report.json").read_text())["config"]
    for key in (
        "seed",
        "n_teacher",
        "teacher_steps",
        "teacher_guidance",
        "train_steps",
        "batch",
        "lr",
        "grid",
    ):
        assert shipped[key] == getattr(cfg, key) or list(getattr(cfg, key)) == shipped[key], key
    with pytest.raises(ValueError, match="recipe='ode'"):
        DistillConfig(recipe="ode")


def test_rerun_targets_are_the_teachers_ode_endpoints():
    """``recipe="rerun"``: each re-noised endpoint's target is the guided teacher's ODE run from it; "endpoint" skips
    the re-run. Tiny: 4 captions, the 4-step teacher grid."""
    from diffusers import DDPMScheduler

    pipe = _pipeline(SANDBOX_PIPELINE)
    ac = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    prompts = grammar_prompts(4, 3)
    args = (pipe.unet, pipe.text_encoder, pipe.tokenizer, ac, prompts)
    rerun = teacher_data(DistillConfig(recipe="rerun", teacher_steps=4, teacher_batch=4), *args)
    endpoint = teacher_data(DistillConfig(teacher_steps=4, teacher_batch=4), *args)
    assert torch.equal(rerun.x0, endpoint.x0) and torch.equal(rerun.states[:, 0], endpoint.states[:, 0])
    assert not endpoint.renoised_x0.any() and rerun.renoised_x0.abs().sum() > 0
    uncond = encode_text(pipe.text_encoder, pipe.tokenizer, [""])
    for i in range(4):
        k = int(rerun.renoised_k[i])
        want = guided_ode(
            pipe.unet, rerun.renoised[i : i + 1], rerun.cond[i : i + 1], uncond, [*GRID[k:], 0], 5.0, ac
        )
        torch.testing.assert_close(rerun.renoised_x0[i : i + 1], want, rtol=1e-4, atol=1e-4)


def test_quick_build_writes_a_loadable_model(tmp_path, capsys):
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

    out = tmp_path / "distilled"
    assert _script().main(["--quick", "--output-dir", str(out)]) == 0
    assert "| distilled, Euler-a 4 steps, no CFG |" in capsys.readouterr().out
    assert _script().main(["--quick", "--measure-only", str(out)]) == 0  # measures, writes nothing
    assert capsys.readouterr().out.count("| distilled, Euler-a 4 steps, no CFG |") == 2
    report = json.loads((out / "distill_report.json").read_text())
    assert report["config"]["train_steps"] == DistillConfig.quick().train_steps
    assert (
        report["sizes_bytes"]["total"] == report["sizes_bytes"]["unet"] + report["sizes_bytes"]["scheduler"]
    )
    assert set(report["metrics"]) == {"test_unique", "grammar"}
    for table in report["metrics"].values():
        assert len(table) == 5 and all(0.0 <= r["prompt_following"]["mean"] <= 1.0 for r in table.values())
    assert "--quick" in report["command"] and (out / "README.md").is_file()
    assert not (tmp_path / ".staging-distilled").exists()
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    scheduler = EulerAncestralDiscreteScheduler.from_pretrained(out / "scheduler")
    assert unet.config.sample_size == 8 and scheduler.config.prediction_type == "epsilon"
    pipe = _pipeline(materialise_pipeline(tmp_path / "cache", out, SANDBOX_PIPELINE))
    images = pipe(["a red circle"], num_inference_steps=4, guidance_scale=0.0, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_shipped_scheduler_visits_the_turbo_grid():
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    sched = EulerAncestralDiscreteScheduler.from_pretrained(SANDBOX_DISTILLED / "scheduler")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]
    assert sched.config.prediction_type == "epsilon" and sched.config.timestep_spacing == "trailing"
    base = DDIMScheduler.from_pretrained(SANDBOX_PIPELINE / "scheduler")
    assert torch.equal(sched.alphas_cumprod, base.alphas_cumprod)  # the base's betas


def test_sandbox_4step_is_an_offline_pipeline_directory(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path("sandbox-4step")
    assert (
        Path(path).parent == tmp_path / "cache" and resolve_model_path("sandbox-4step") == path
    )  # built once
    assert json.loads((Path(path) / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        SCHEDULER_CLASS,
    ]
    pipe = _pipeline(path, local_files_only=True)
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    shipped = _pipeline(SANDBOX_PIPELINE).unet  # the distilled UNet differs from the base's
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), shipped.parameters()))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(["a red circle", "a blue square on the left"], num_inference_steps=4, guidance_scale=0.0,
               generator=gens, output_type="np")  # fmt: skip
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    # training reads the same directory: a DDPM training scheduler with the base's schedule and epsilon prediction
    comp = load_components("sandbox-4step")
    assert isinstance(comp.noise_scheduler, DDPMScheduler) and comp.prediction_type == "epsilon"
    assert torch.equal(comp.noise_scheduler.alphas_cumprod, DDPMScheduler.from_pretrained(
        SANDBOX_PIPELINE, subfolder="scheduler").alphas_cumprod)  # fmt: skip


def test_materialise_copies_where_links_fail(tmp_path, monkeypatch):
    def refuse(self, *a, **k):
        raise OSError("no symbolic links here")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    path = materialise_pipeline(tmp_path, SANDBOX_DISTILLED, SANDBOX_PIPELINE)
    assert all((path / c).is_dir() and not (path / c).is_symlink() for c in ("unet", "vae", "tokenizer"))
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        SANDBOX_DISTILLED / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_shipped_model_follows_prompts_in_4_steps_without_guidance():
    """The effect, on 128 held-out grammar captions x one seed each (~20 s). Measured on five draws of captions
    (``grammar_prompts(128, seed)``, seeds 7-11): distilled 4-step minus base 4-step (the same Euler-ancestral
    sampler, no guidance) +0.080 to +0.110 prompt-following (paired standard error ~0.02); base 20-step guided minus
    distilled +0.040 to +0.068 (standard error ~0.017; 0.057 ± 0.010 on 400 captions, and -0.004 ± 0.009 on the
    evaluation protocol's 200 test_unique prompts x seeds {0, 1}: docs/sandbox.md). At this size a gap of 0.05
    cannot be resolved, so the second check allows the test's own noise: gap <= 0.05 + 2 standard errors."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from diffalign.eval.compare import generate
    from diffalign.sandbox.judge import Judge

    euler = EulerAncestralDiscreteScheduler.from_pretrained(SANDBOX_DISTILLED / "scheduler")
    distilled = _pipeline(
        SANDBOX_PIPELINE,
        unet=UNet2DConditionModel.from_pretrained(SANDBOX_DISTILLED / "unet"),
        scheduler=euler,
    )
    base_4 = _pipeline(SANDBOX_PIPELINE, scheduler=euler)
    base = _pipeline(SANDBOX_PIPELINE)
    prompts = grammar_prompts(128, 8)
    seeds = list(range(len(prompts)))
    judge = Judge()

    def pf(pipe, steps, guidance):
        images = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, batch_size=len(prompts))
        assert images.shape == (len(prompts), 32, 32, 3)
        return judge.score(images, prompts)["prompt_following"]

    d, b4, b20 = pf(distilled, 4, 0.0), pf(base_4, 4, 0.0), pf(base, 20, 5.0)

    def se(x):
        return float(x.std(ddof=1) / np.sqrt(len(x)))

    gain, gap = float((d - b4).mean()), float((b20 - d).mean())  # measured here: +0.080, +0.064
    assert gain >= 0.04 and gain > 3 * se(d - b4), (gain, se(d - b4))
    assert gap <= 0.05 + 2 * se(b20 - d), (gap, se(b20 - d))

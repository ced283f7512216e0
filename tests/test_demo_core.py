"""The demo's unit (demo/core.py) without a browser: input bounds, path restriction, aligned-model kinds, same-seed
generation, LoRA-scale interpolation, scoring and the gallery tally. Tiny pipelines built here (16 px, rendered at
32 px where the sandbox judge scores them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_sd

from demo import core
from diffalign.eval.compare import generate
from diffalign.sandbox import SANDBOX_PIPELINE

PROMPT = "a large red circle on the left on a white background"

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a base pipeline and every aligned layout


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_lora(base: Path, out: Path, seed: int = 1, std: float = 0.5) -> Path:
    """A LoRA on the tiny UNet with nonzero ``lora_B`` (so it changes the images), saved in diffusers format."""
    from diffusers import UNet2DConditionModel

    from diffalign.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    add_lora(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * std
    save_lora(out, unet)
    return out


def perturbed_unet(base: Path, seed: int = 2, std: float = 0.05):
    """The base UNet with every float weight shifted by N(0, std²) noise (a stand-in for full fine-tuning)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return unet


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo_models")
    base = build_tiny_sd(root / "base")
    lora = make_lora(base, root / "lora")
    unet = perturbed_unet(base)
    unet.save_pretrained(root / "unet")
    return {"root": root, "base": base, "lora": lora, "unet": root / "unet"}


@pytest.fixture()
def engine(models) -> core.DemoEngine:
    cfg = core.DemoConfig(
        base=str(models["base"]), aligned=str(models["lora"]), roots=[models["root"].resolve()], resolution=32
    )
    return core.DemoEngine(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Input bounds


def test_validate_request_accepts_in_bounds_and_expands_seeds():
    req = core.validate_request(f"  {PROMPT} ", "  blurry ", 5, 20, 7.5, 3, 0.5)
    assert req == core.Request(PROMPT, "blurry", (5, 6, 7), 20, 7.5, 0.5)
    # floats from number widgets that are whole numbers are accepted; an empty negative prompt becomes None
    assert core.validate_request(PROMPT, "", 4.0, 10.0, 0, 1.0, 0).seeds == (4,)
    assert core.validate_request(PROMPT, "", 0, 1, 0, 1, 0).negative_prompt is None
    # bounds are inclusive: the last seed may be exactly the maximum
    assert core.validate_request(PROMPT, "", 2**32 - 2, 100, 20, 2, 2).seeds == (2**32 - 2, 2**32 - 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": "a" * 301}, "301 characters; at most 300"),
        ({"negative_prompt": "b" * 301}, "negative prompt has 301 characters"),
        ({"steps": 0}, "steps must be between 1 and 100, got 0"),
        ({"steps": 101}, "steps must be between 1 and 100, got 101"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"guidance": 20.5}, "guidance must be between 0 and 20, got 20.5"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"seed": -1}, "seed must be between 0 and 4294967295, got -1"),
        ({"seed": "abc"}, "seed must be a whole number"),
        ({"seed": 2**32 - 1, "num_images": 2}, "got 4294967295 (the last of the 2 seeds is 4294967296)"),
        ({"num_images": 9}, "number of seeds must be between 1 and 8, got 9"),
        ({"num_images": 0}, "number of seeds must be between 1 and 8, got 0"),
        ({"scale": 2.5}, "LoRA scale must be between 0 and 2, got 2.5"),
    ],
)
def test_validate_request_rejects_out_of_bounds(kwargs, message):
    args = {
        "prompt": PROMPT,
        "negative_prompt": "",
        "seed": 0,
        "steps": 20,
        "guidance": 5.0,
        "num_images": 1,
        "scale": 1.0,
        **kwargs,
    }
    with pytest.raises(core.InputError) as info:
        core.validate_request(**args)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Path restriction


def test_paths_inside_roots_are_resolved_and_outside_rejected(tmp_path):
    root = (tmp_path / "models").resolve()
    (root / "m").mkdir(parents=True)
    roots = [root]
    assert core.check_model_path(str(root / "m"), roots) == core.ModelRef(str(root / "m"))
    # `..` is resolved before the check: root/m/../m stays inside, root/../secret does not
    assert core.check_model_path(f"{root}/m/../m", roots).location == str(root / "m")
    _touch(tmp_path / "secret" / "model_index.json")
    with pytest.raises(core.ModelPathError, match="outside the folders"):
        core.check_model_path(f"{root}/../secret", roots)
    with pytest.raises(core.ModelPathError, match="--allow-root"):
        core.check_model_path("/etc/passwd", roots)


def test_symlink_out_of_a_root_is_rejected(tmp_path):
    root = (tmp_path / "models").resolve()
    root.mkdir()
    _touch(tmp_path / "outside" / "model_index.json")
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(core.ModelPathError, match="outside the folders"):
        core.check_model_path(str(root / "link"), [root])


def test_existence_outside_roots_is_not_revealed(tmp_path):
    root = (tmp_path / "models").resolve()
    root.mkdir()
    _touch(tmp_path / "exists" / "f")
    msgs = []
    for name in ("exists", "does-not-exist"):
        with pytest.raises(core.ModelPathError) as info:
            core.check_model_path(str(tmp_path / name), [root])
        msgs.append(str(info.value).replace(name, "NAME"))
    assert msgs[0] == msgs[1]


def test_hub_ids_only_with_allow_hub_and_sandbox_name(tmp_path):
    roots = [tmp_path.resolve()]
    with pytest.raises(core.ModelPathError, match="--allow-hub"):
        core.check_model_path("stabilityai/stable-diffusion-xl-base-1.0", roots)
    ref = core.check_model_path("stabilityai/stable-diffusion-xl-base-1.0", roots, allow_hub=True)
    assert ref == core.ModelRef("stabilityai/stable-diffusion-xl-base-1.0", hub=True)
    # "sandbox" names the shipped pipeline, which is under a default root
    assert core.check_model_path("sandbox", core.default_roots()).location == str(SANDBOX_PIPELINE.resolve())
    with pytest.raises(core.ModelPathError, match="outside"):
        core.check_model_path("sandbox", roots)


def test_default_roots_include_env_and_flags(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(core.ROOTS_ENV, f"{a}:{a}")
    roots = core.default_roots([b, str(tmp_path / "c" / ".." / "b")])
    assert roots[:2] == [(core.DEMO_DIR / "assets").resolve(), core.ASSETS_DIR.resolve()]
    assert roots[3:] == [a.resolve(), b.resolve()]  # duplicates dropped, `..` resolved


# ---------------------------------------------------------------------------------------------------------------
# Aligned-model layouts (files only, no weights loaded)


@pytest.mark.parametrize(
    "files, kind, target, note",
    [
        (["pytorch_lora_weights.safetensors"], "lora", "", ""),
        (["lora/pytorch_lora_weights.safetensors", "README.md"], "lora", "lora", ""),
        (["model_index.json", "unet/config.json"], "pipeline", "", ""),
        (["config.json", "diffusion_pytorch_model.safetensors"], "unet", "", ""),
        (["unet/config.json", "unet/diffusion_pytorch_model.safetensors"], "unet", "unet", ""),
        (["model.safetensors", "train_state.json"], "unet_state", "model.safetensors", ""),
        (
            [
                "checkpoint-3/pytorch_lora_weights.safetensors",
                "checkpoint-10/pytorch_lora_weights.safetensors",
                "checkpoint-20/optimizer.bin",  # newest, but holds no model: skipped
                "eval.json",
            ],
            "lora",
            "checkpoint-10",  # numeric order: 10 > 3 (a string sort would pick 3)
            "newest usable checkpoint: checkpoint-10 (step 10)",
        ),
    ],
)
def test_resolve_aligned_kinds(tmp_path, files, kind, target, note):
    for f in files:
        _touch(tmp_path / "run" / f)
    spec = core.resolve_aligned(core.ModelRef(str(tmp_path / "run")))
    assert spec == core.AlignedSpec(kind, str(tmp_path / "run" / target).rstrip("/"), note)


def test_resolve_aligned_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="no aligned model found at"):
        core.resolve_aligned(core.ModelRef(str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(core.ModelPathError, match="holds no model the demo can load"):
        core.resolve_aligned(core.ModelRef(str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------------------------------
# Loading, generation, interpolation


def _req(seeds=(0, 1), scale=1.0, steps=2):
    return core.Request(PROMPT, None, tuple(seeds), steps, 5.0, scale)


def test_lora_pair_same_seeds_and_scale(models):
    from diffusers import DiffusionPipeline

    pair = core.load_pair(core.ModelRef(str(models["base"])), core.ModelRef(str(models["lora"])))
    assert pair.kind == "lora" and pair.notice == ""
    base, aligned = core.generate_both(pair, _req())
    assert base.shape == aligned.shape == (2, 16, 16, 3) and base.dtype == np.uint8
    # the base side is exactly the plain base pipeline with the same seeds
    plain = DiffusionPipeline.from_pretrained(models["base"])
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(base, generate(plain, [PROMPT] * 2, [0, 1], steps=2, guidance=5.0))
    assert np.abs(base.astype(int) - aligned).mean() > 1.0  # the LoRA changes the images
    # a row depends on its seed only, not on the other seeds of the click
    b1, a1 = core.generate_both(pair, _req(seeds=(1,)))
    np.testing.assert_array_equal(b1[0], base[1])
    np.testing.assert_array_equal(a1[0], aligned[1])
    # scale 0 is the base; 0.5 lies between; back to 1 gives the aligned images again
    b0, a0 = core.generate_both(pair, _req(scale=0.0))
    np.testing.assert_array_equal(a0, base)
    _, ahalf = core.generate_both(pair, _req(scale=0.5))
    assert not np.array_equal(ahalf, base) and not np.array_equal(ahalf, aligned)
    _, again = core.generate_both(pair, _req(scale=1.0))
    np.testing.assert_array_equal(again, aligned)


def test_full_unet_pair_interpolates_weights(models):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    pair = core.load_pair(core.ModelRef(str(models["base"])), core.ModelRef(str(models["unet"])))
    assert pair.kind == "unet" and pair.aligned_pipe.unet is not pair.base_pipe.unet
    assert pair.aligned_pipe.vae is pair.base_pipe.vae  # everything but the UNet is shared
    base, aligned = core.generate_both(pair, _req(seeds=(3,)))
    ref = DiffusionPipeline.from_pretrained(models["base"])
    ref.unet = UNet2DConditionModel.from_pretrained(models["unet"])
    ref.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(aligned, generate(ref, [PROMPT], [3], steps=2, guidance=5.0))
    assert not np.array_equal(base, aligned)
    _, a0 = core.generate_both(pair, _req(seeds=(3,), scale=0.0))
    np.testing.assert_array_equal(a0, base)
    # θ(0.25) = θ_base + 0.25 (θ_aligned − θ_base), checked on one weight
    pair.set_scale(0.25)
    name = "conv_in.weight"
    want = torch.lerp(pair.base_pipe.unet.state_dict()[name], pair._aligned_state[name], 0.25)
    torch.testing.assert_close(pair.aligned_pipe.unet.state_dict()[name], want, rtol=0, atol=0)
    _, a1 = core.generate_both(pair, _req(seeds=(3,), scale=1.0))
    np.testing.assert_array_equal(a1, aligned)


def test_unet_state_checkpoint_and_pipeline_dir(models, tmp_path):
    from safetensors.torch import save_file

    unet = perturbed_unet(models["base"], seed=5)
    ckpt = tmp_path / "run" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, ckpt / "model.safetensors")
    (ckpt / "train_state.json").write_text(json.dumps({"step": 7}))
    full = tmp_path / "full"
    shutil.copytree(models["base"], full)
    unet.save_pretrained(full / "unet")
    outs = {}
    for name, path in (("state", tmp_path / "run"), ("pipeline", full)):
        pair = core.load_pair(core.ModelRef(str(models["base"])), core.ModelRef(str(path)))
        outs[name] = core.generate_both(pair, _req(seeds=(0,)))[1]
        assert pair.kind == {"state": "unet_state", "pipeline": "pipeline"}[name]
    assert "checkpoint-7" in core.resolve_aligned(core.ModelRef(str(tmp_path / "run"))).note
    np.testing.assert_array_equal(outs["state"], outs["pipeline"])  # same weights, two layouts


def test_missing_aligned_is_base_vs_base_with_notice(models, tmp_path):
    pair = core.load_pair(core.ModelRef(str(models["base"])), core.ModelRef(str(tmp_path / "not-yet")))
    assert pair.kind == "none"
    assert pair.notice == f"no aligned model found at {tmp_path / 'not-yet'}; showing base vs base"
    base, aligned = core.generate_both(pair, _req(seeds=(0,)))
    np.testing.assert_array_equal(base, aligned)


def test_cache_loads_once_and_evicts(models, tmp_path):
    cache = core.ModelCache(capacity=1)
    b, a = core.ModelRef(str(models["base"])), core.ModelRef(str(models["lora"]))
    first = cache.get(b, a)
    assert cache.get(b, a) is first and cache.loads == 1
    cache.get(b, None)
    assert cache.loads == 2 and cache.get(b, a) is not first and cache.loads == 3
    # base vs base while the aligned folder is missing; reloaded once it appears
    later = core.ModelRef(str(tmp_path / "later"))
    assert cache.get(b, later).kind == "none" and cache.get(b, later).kind == "none" and cache.loads == 4
    shutil.copytree(models["lora"], tmp_path / "later")
    assert cache.get(b, later).kind == "lora" and cache.loads == 5


# ---------------------------------------------------------------------------------------------------------------
# Scoring and tally


def test_judge_scores_overall_and_four_aspects():
    from diffalign.sandbox.captions import parse_caption, scene_for_spec
    from diffalign.sandbox.judge import Judge
    from diffalign.sandbox.scene import render

    scene = scene_for_spec(parse_caption(PROMPT), np.random.default_rng(0))
    images = np.stack([render(scene), np.full((32, 32, 3), 255, np.uint8)])
    scores = core.Scorer().score("sandbox-judge", images, [PROMPT, PROMPT])
    assert scores.ok and list(scores.values) == list(core.JUDGE_KEYS)
    want = Judge().score(images, [PROMPT, PROMPT])
    for k in core.JUDGE_KEYS:
        np.testing.assert_allclose(scores.values[k], want[k], rtol=1e-6)
    assert scores.values["overall"][0] > scores.values["overall"][1]  # the right picture beats a blank one
    text = core.format_scores(scores, 1)
    assert text.splitlines()[0] == f"**overall** {want['overall'][1]:.3f}  " and text.count("**") == 10


def test_unscorable_prompt_and_missing_reward_give_notes():
    images = np.zeros((1, 32, 32, 3), np.uint8)
    scorer = core.Scorer()
    s = scorer.score("sandbox-judge", images, ["a photo of a cat"])
    assert not s.ok and s.note.startswith("reward 'sandbox-judge' cannot score this prompt")
    assert core.format_scores(s).startswith("⚠️ reward 'sandbox-judge' cannot score this prompt")
    s = scorer.score("no-such-reward", images, [PROMPT])
    assert not s.ok and "not available" in s.note and "valid names" in s.note
    s = scorer.score("sandbox-judge", np.zeros((1, 16, 16, 3), np.uint8), [PROMPT])  # judge needs 32x32
    assert not s.ok and "cannot score this prompt or these images" in s.note


def test_tally_hand_computed():
    base = core.Scores({"overall": np.array([0.5, 0.5, 0.5, 0.5])})
    aligned = core.Scores({"overall": np.array([0.6, 0.4, 0.5, 0.7])})
    t = core.tally(base, aligned, "overall")
    assert t.outcomes == ["win", "loss", "tie", "win"]
    s = t.stats
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (2, 1, 1, 4)
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert s["mean_diff"] == pytest.approx(0.05)
    assert "**2 win / 1 tie / 1 loss**" in t.line() and "win rate 0.62" in t.line()
    with pytest.raises(KeyError, match="aesthetic"):
        core.tally(base, aligned, "aesthetic")


def test_enlarge_nearest_blocks():
    img = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    big = core.enlarge(img, min_side=5)  # k = ceil(5 / 2) = 3
    assert big.shape == (1, 6, 6, 3)
    np.testing.assert_array_equal(big[0, 3:6, 0:3], np.broadcast_to(img[0, 1, 0], (3, 3, 3)))


# ---------------------------------------------------------------------------------------------------------------
# The engine the page calls


def test_engine_run_scores_both_sides(engine, models):
    req = core.validate_request(PROMPT, "", 0, 2, 5.0, 2, 1.0)
    res = engine.run(str(models["base"]), str(models["lora"]), req, "sandbox-judge")
    assert res.base.shape == res.aligned.shape == (2, 32, 32, 3)  # --resolution 32 for the judge
    assert res.base_scores.ok and res.aligned_scores.ok
    assert res.base_scores.values["overall"].shape == (2,)
    t = core.tally(res.base_scores, res.aligned_scores, "overall")
    assert t.stats["n"] == 2 and len(t.outcomes) == 2


def test_engine_describe_and_load_failures(engine, models, tmp_path):
    assert "aligned (lora)" in engine.describe(str(models["base"]), str(models["lora"]))
    assert engine.describe(str(models["base"]), str(models["root"] / "nope")).endswith(
        "; showing base vs base"
    )
    assert engine.describe("/etc", "").startswith("⚠️") and "outside" in engine.describe("/etc", "")
    assert "model_index.json is missing" in engine.describe(str(models["root"]), "")
    req = _req(seeds=(0,))
    with pytest.raises(core.ModelPathError, match="outside"):
        engine.run("/etc", "", req, "sandbox-judge")
    with pytest.raises(core.ModelPathError, match="model_index.json is missing"):
        engine.run(str(models["root"]), "", req, "sandbox-judge")
    broken = models["root"] / "broken"
    _touch(broken / "model_index.json", "{not json")
    with pytest.raises(Exception):  # noqa: B017 - any load error; the page turns it into a message
        engine.run(str(broken), "", req, "sandbox-judge")
    assert engine.cache.loads == 0  # nothing half-loaded was cached
    res = engine.run(str(models["base"]), "", req, "sandbox-judge")  # and the engine still works
    assert res.pair.kind == "none" and res.pair.notice == "no aligned model given; showing base vs base"


def test_app_turns_errors_into_messages():
    gr = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from demo.app import _fail

    err = _fail(core.InputError("steps must be between 1 and 100, got 0"))
    assert isinstance(err, gr.Error) and err.message == "steps must be between 1 and 100, got 0"
    err = _fail(OSError("disk on fire"))
    assert isinstance(err, gr.Error) and err.message == "OSError: disk on fire"


def test_app_listens_where_gradio_env_vars_say_unless_flags_override():
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from demo.app import parse_args

    args = parse_args([], environ={})
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}  # what Spaces / Docker images set
    args = parse_args([], environ=env)
    assert (args.host, args.port) == ("0.0.0.0", 7861)
    args = parse_args(["--host", "127.0.0.1", "--port", "9000"], environ=env)
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    with pytest.raises(SystemExit, match="GRADIO_SERVER_PORT"):
        parse_args([], environ={"GRADIO_SERVER_PORT": "http"})


def test_app_reads_the_process_environment_by_default(monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from demo.app import parse_args

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7862")
    args = parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7862)

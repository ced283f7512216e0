"""Configs: every shipped YAML loads, precedence default < YAML < flag, and bad values name the field."""

from pathlib import Path

import pytest
import yaml

from diffalign.config import DPOConfig, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
ACCELERATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_training_config_loads_and_says_how_to_run_it(path):
    import yaml as _yaml

    from diffalign.config import OnlineConfig
    from diffalign.objectives.registry import get_objective

    data = _yaml.safe_load(path.read_text())
    objective = data.get("objective", "dpo")
    online = get_objective(objective).loop == "online"
    subjects = any(k.startswith("subject_") for k in data)  # run per subject by scripts/train_subjects.py
    cls = OnlineConfig if online else DPOConfig
    if subjects:
        from diffalign.training.subjects import split_argv

        split_argv(data, [])  # the driver's own keys are valid
        cfg = parse_config(cls, ["--config", str(_write(path, data))])
    else:
        cfg = parse_config(cls, ["--config", str(path)])
    assert isinstance(cfg, cls)
    script = (
        "scripts/train_online.py"
        if online
        else "scripts/train_subjects.py"
        if subjects
        else "scripts/train_diffusion_dpo.py"
    )
    assert script in path.read_text().split("\n\n")[0], f"{path} must name the script that trains it"
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and "scripts/" in path.read_text().split("\n\n")[0], (
        f"{path} must start with the command that runs it"
    )


def _write(path: Path, data: dict) -> Path:
    """The training part of a subject config (without its subject_* keys), written where it can be parsed."""
    import tempfile

    out = Path(tempfile.mkdtemp()) / path.name
    out.write_text(yaml.safe_dump({k: v for k, v in data.items() if not k.startswith("subject_")}))
    return out


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU", "NO"}
    assert path.read_text().startswith("#")


def test_precedence_default_yaml_flag(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("beta: 2000\nlearning_rate: 3.0e-5\nvalidation_seeds: [4, 5]\n")
    cfg = parse_config(
        DPOConfig, ["--config", str(y), "--beta", "2500", "--lora_target_modules", "to_q,to_v"]
    )
    assert cfg.beta == 2500.0  # flag beats YAML
    assert cfg.learning_rate == 3e-5  # YAML beats default
    assert cfg.validation_seeds == [4, 5]
    assert cfg.lora_target_modules == ["to_q", "to_v"]
    assert cfg.max_train_steps == DPOConfig().max_train_steps  # default


def test_bool_and_none_flags():
    cfg = parse_config(
        DPOConfig,
        ["--use_cache", "false", "--max_train_samples", "none", "--resume_from_checkpoint", "latest"],
    )
    assert cfg.use_cache is False and cfg.max_train_samples is None and cfg.resume_from_checkpoint == "latest"


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        parse_config(DPOConfig, ["--loss_type", "squared"])
    with pytest.raises(ValueError, match="--beta expects float"):
        parse_config(DPOConfig, ["--beta", "lots"])
    y = tmp_path / "bad.yaml"
    y.write_text("betta: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: 'betta' is not a field \(did you mean 'beta'\?\)"):
        parse_config(DPOConfig, ["--config", str(y)])
    with pytest.raises(ValueError, match="streaming"):
        DPOConfig(streaming=True, use_cache=True)
    with pytest.raises(ValueError, match="cache_batch_size must be >= 1, got 0"):
        parse_config(DPOConfig, ["--cache-batch-size", "0"])


def test_resolution_must_be_a_multiple_of_the_vae_downsampling(tmp_path):
    """SD-shaped VAEs (4 blocks) downsample 8x, the sandbox's (3 blocks) 4x: a resolution off that grid is refused,
    read from a local pipeline's vae/config.json before loading, or from the loaded VAE's config (hub ids)."""
    import json

    from diffalign.errors import ConfigError
    from diffalign.preflight import check_resolution, vae_downsampling

    sd = {"block_out_channels": [128, 256, 512, 512]}
    assert vae_downsampling(sd) == 8 and vae_downsampling({"block_out_channels": [16, 32, 32]}) == 4
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(sd))
    check_resolution(512, str(tmp_path))
    with pytest.raises(ConfigError, match=r"resolution=516 is not a multiple of 8, .* e\.g\. 512 or 520"):
        check_resolution(516, str(tmp_path))
    check_resolution(516, "owner/hub-model")  # no local config: checked after loading
    with pytest.raises(ConfigError, match=r"resolution=4 is not a multiple of 8, .* e\.g\. 8 or 16"):
        check_resolution(4, "owner/hub-model", vae_config=sd)
    check_resolution(32, "sandbox")
    check_resolution(32, "sandbox-4step")
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_resolution(30, "sandbox-4step")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num_prompts", "0"], "num_prompts must be >= 1 (or left out for all), got 0"),
        (["--min_supported_share", "2"], "min_supported_share must be in [0, 1], got 2.0"),
    ],
)
def test_a_check_of_a_benchmark_config_is_a_config_error(argv, expected):
    """A settings dataclass whose ``__post_init__`` raises ValueError reaches people as a ConfigError (one line, no
    traceback), like the training configs' own checks."""
    from diffalign.errors import ConfigError
    from diffalign.eval.benchmark_pickapic import PickapicBenchmarkConfig

    with pytest.raises(ConfigError) as err:
        parse_config(PickapicBenchmarkConfig, argv)
    assert str(err.value) == expected


def test_count_flags_of_the_scripts_refuse_zero_and_negative_counts():
    """``diffalign.cli.at_least`` is the argparse type of the scripts' counts (steps, epochs, processes): the parser
    refuses a count below its minimum in one line, naming the flag, instead of a later division by zero."""
    import argparse

    from diffalign.cli import at_least

    p = argparse.ArgumentParser(prog="script.py", exit_on_error=False)
    p.add_argument("--steps", type=at_least(1), default=20)
    p.add_argument("--warmup", type=at_least(0), default=3)
    assert p.parse_args(["--steps", "5", "--warmup", "0"]) == argparse.Namespace(steps=5, warmup=0)
    for argv, message in [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--warmup", "-2"], "argument --warmup: must be >= 0, got -2"),
        (["--steps", "2.5"], "argument --steps: expects a whole number, got '2.5'"),
    ]:
        with pytest.raises(argparse.ArgumentError) as err:
            p.parse_args(argv)
        assert str(err.value) == message


def _manifest(path: Path, **fields) -> Path:
    body = {"name": path.stem, "kind": "hf_clip", "description": "-", "weights": {}, "params": {},
            "preprocessing": "-", "output_scale": "-", "licence": "-", **fields}  # fmt: skip
    path.write_text(yaml.safe_dump(body))
    return path


def test_missing_reward_weights_are_named_before_anything_loads(tmp_path, monkeypatch):
    """The weights of the rewards a run loads (the final evaluation's, the online loop's, each component of a
    combined manifest) are checked by the configuration check: a missing one used to stop a run after its training,
    before its export."""
    from diffalign.preflight import MissingWeightsError, check_reward_weights

    monkeypatch.delenv("DIFFALIGN_REWARD_WEIGHTS", raising=False)
    weights = {"model": {"path": "weights/m", "source": "somewhere", "get": "fetch m"}}
    one = _manifest(tmp_path / "one.yaml", weights=weights)
    two = _manifest(tmp_path / "two.yaml")  # no weights
    both = _manifest(tmp_path / "both.yaml", kind="combined", params={
        "components": [{"reward": str(two), "weight": 1.0}, {"reward": str(one), "weight": 2.0}]})  # fmt: skip
    check_reward_weights("eval_reward", str(two))
    for spec in (str(one), str(both), f"{two}:1,{one}:0.5"):
        with pytest.raises(MissingWeightsError) as err:
            check_reward_weights("reward", spec)
        assert str(err.value).startswith(
            "config field reward: reward 'one': weights 'model' (weights/m) not found"
        )
        assert "fetch m" in str(err.value)
    (tmp_path / "weights" / "m").mkdir(parents=True)
    for spec in (str(one), str(both), f"{two}:1,{one}:0.5"):
        check_reward_weights("reward", spec)
    monkeypatch.setenv("DIFFALIGN_REWARD_WEIGHTS", str(tmp_path / "elsewhere"))
    check_reward_weights("reward", str(one))  # the manifest's own folder is still searched


def test_a_run_whose_evaluation_reward_lacks_weights_stops_before_loading(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    weights = {"model": {"path": "weights/absent", "source": "nowhere"}}
    manifest = _manifest(tmp_path / "absent.yaml", weights=weights)
    argv = [sys.executable, "-X", "importtime", str(repo / "scripts" / "train_diffusion_dpo.py"), "--eval_reward",
            str(manifest), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]
    assert lines[0] == (
        "configuration error: config field eval_reward: reward 'absent': weights 'model' (weights/absent) not found. "
        "Tried:"
    )
    imported = {x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")}
    assert "torch" not in imported and not (tmp_path / "out").exists()
    from diffalign.config import TrainConfig

    skipping = ["--eval_reward", str(manifest), "--skip_eval", "true", "--output_dir", str(tmp_path / "out")]
    parse_config(TrainConfig, skipping).check_paths()  # no final evaluation: its reward is not loaded


def test_the_ppd_pair_encoder_is_checked_before_loading(tmp_path, monkeypatch):
    """``user_encoder`` names something on disk (a VLM or CLIP directory, a CLIP reward with its weights) or the
    built-in stand-in; anything else is one line before any model loads, not after the pipeline and data."""
    from diffalign.errors import ConfigError
    from diffalign.preflight import MissingWeightsError, check_user_encoder

    monkeypatch.delenv("DIFFALIGN_REWARD_WEIGHTS", raising=False)
    for ok in ("sandbox-attributes", "sandbox-clip", str(tmp_path), f"vlm:{tmp_path}"):
        check_user_encoder(ok)
    with pytest.raises(ConfigError, match=r"user_encoder='vlm:/no/such': no such directory '/no/such'"):
        check_user_encoder("vlm:/no/such")
    with pytest.raises(
        ConfigError, match=r"user_encoder='/no/such': no such directory; give a CLIP directory"
    ):
        check_user_encoder("/no/such")
    with pytest.raises(ConfigError, match="config field user_encoder: unknown reward 'no-such-clip'"):
        check_user_encoder("no-such-clip")
    weights = {"model": {"path": "weights/clip", "source": "somewhere"}}
    with pytest.raises(
        MissingWeightsError, match="config field user_encoder: reward 'clip': weights 'model'"
    ):
        check_user_encoder(str(_manifest(tmp_path / "clip.yaml", weights=weights)))


def test_a_setting_whose_package_is_missing_is_named_before_loading(monkeypatch):
    """8-bit AdamW, xformers and the trackers need optional packages: a missing one is one line naming the field and
    how to install it (accelerate would otherwise drop a missing tracker with a warning and log nothing)."""
    import importlib.util

    from diffalign.config import TrainConfig
    from diffalign.errors import ConfigError
    from diffalign.preflight import check_optional_packages

    missing = {"bitsandbytes", "xformers", "wandb"}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    check_optional_packages(parse_config(TrainConfig, []))  # the defaults need nothing optional
    for flags, message in [
        (["--optimizer", "adamw8bit"], "optimizer='adamw8bit' needs the bitsandbytes package"),
        (["--attention", "xformers"], "attention='xformers' needs the xformers package"),
        (
            ["--report_to", "wandb"],
            "report_to='wandb' needs the wandb package, which is not installed: pip install",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_optional_packages(parse_config(TrainConfig, flags))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # all installed
    check_optional_packages(parse_config(TrainConfig, ["--report_to", "wandb", "--attention", "xformers"]))

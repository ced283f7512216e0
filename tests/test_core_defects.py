"""The defects hostile use found in the Diffusion-DPO core (issue 9), each pinned by a test that failed before.

Tiny SD1.x/SDXL-shaped pipelines built in the test (seconds per run), the real command line where the defect was
in it, the trainer in-process where a fault has to be injected.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import ENV, REPO, SCRIPT, losses, make_tiny, run_script, tiny_args
from safetensors.torch import load_file, save_file

from diffalign.config import TrainConfig, parse_config
from diffalign.errors import ConfigError, TrainingError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _args(model, data, out, *extra):
    return tiny_args(model, data, out, "--deterministic", "false", *extra, steps=4, checkpointing=2)


def _cli(args, timeout=300):
    return run_script(args, timeout=timeout, check=False)


def _ok(proc):
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


_losses = losses


def _trainer(model, data, out, **overrides):
    from diffalign.training.offline import OfflinePairsTrainer

    cfg = parse_config(
        TrainConfig, _args(model, data, out, *[x for k, v in overrides.items() for x in (f"--{k}", str(v))])
    )
    trainer = OfflinePairsTrainer(cfg)
    trainer.setup()
    return trainer


# ---- mixed precision -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_full_finetuning_dpo_under_bf16_mixed_precision(tiny, tmp_path, model):
    # Before: the frozen float32 reference copy got bf16 inputs without autocast -> "mat1 and mat2 must have the
    # same dtype"; SDXL's text_embeds/time_ids reached the UNet uncast.
    out = tmp_path / "run"
    _ok(_cli(_args(tiny[model], tiny["data"], out, "--finetune", "full", "--mixed_precision", "bf16",
                   "--max_train_steps", "2", "--checkpointing_steps", "0")))  # fmt: skip
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# ---- ties as soft labels ---------------------------------------------------------------------------------------------


def test_a_kept_tie_pulls_the_margin_to_zero_not_towards_image_0():
    from diffalign.objectives.dpo import diffusion_dpo_loss

    # model errors chosen so that inside = -0.5 * beta * delta = ln 3 (beta 2, delta = -ln 3)
    mw = torch.tensor([0.0, 0.0], requires_grad=True)
    zero = torch.zeros(2)
    ml = torch.tensor([math.log(3.0), math.log(3.0)])
    loss, m = diffusion_dpo_loss(mw, ml, zero, zero, beta=2.0, label_w=torch.tensor([1.0, 0.5]))
    assert m["reward_margin"].tolist() == pytest.approx([math.log(3.0)] * 2)
    # decided pair: -log sigma(ln 3) = -log 0.75; tie: -0.5 log 0.75 - 0.5 log 0.25
    assert loss[0].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert loss[1].item() == pytest.approx(-0.5 * math.log(0.75) - 0.5 * math.log(0.25), abs=1e-6)
    loss.sum().backward()
    # d loss / d inside = -(p - sigma(inside)): -0.25 for the decided pair, +0.25 for the tie (pushes inside to 0);
    # d inside / d mw = -0.5 * beta = -1
    assert mw.grad.tolist() == pytest.approx([0.25, -0.25], abs=1e-6)
    # at a zero margin a tie has zero gradient: the minimum is there
    z = torch.zeros(1, requires_grad=True)
    diffusion_dpo_loss(
        z, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=2.0, label_w=torch.tensor([0.5])
    )[0].sum().backward()
    assert z.grad.item() == 0.0
    # hinge and ipo: the tie's target is a zero margin too
    hinge, _ = diffusion_dpo_loss(
        mw, ml, zero, zero, beta=2.0, loss_type="hinge", label_w=torch.tensor([1.0, 0.5])
    )
    assert hinge.tolist() == pytest.approx(
        [0.0, 0.5 * 0.0 + 0.5 * (1 + math.log(3.0))]  # relu(1 - ln 3) = 0
    )
    ipo, _ = diffusion_dpo_loss(
        mw, ml, zero, zero, beta=2.0, loss_type="ipo", label_w=torch.tensor([1.0, 0.5])
    )
    z_margin = math.log(3.0) / 2.0  # inside / beta
    assert ipo.tolist() == pytest.approx([(z_margin - 0.25) ** 2, z_margin**2], abs=1e-6)


def test_label_smoothing_with_a_soft_label_mixes_both():
    from diffalign.objectives.dpo import diffusion_dpo_loss

    zero = torch.zeros(1)
    loss, _ = diffusion_dpo_loss(zero, torch.tensor([2.0]), zero, zero, beta=1.0, label_smoothing=0.1,
                                 label_w=torch.tensor([1.0]))  # fmt: skip
    plain, _ = diffusion_dpo_loss(zero, torch.tensor([2.0]), zero, zero, beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-7)  # p = 1 is the usual robust-DPO loss
    with pytest.raises(ValueError, match="label_w"):
        diffusion_dpo_loss(zero, zero, zero, zero, beta=1.0, label_w=torch.tensor([1.5]))


# ---- the base of a full fine-tuning without a reference ---------------------------------------------------------------


def test_full_finetuning_sft_compares_against_the_starting_weights(tiny, tmp_path):
    # Before: without a reference the "base" pipeline ran the trained UNet itself (SFT evaluated against itself).
    from diffusers import UNet2DConditionModel

    from diffalign.training import outputs

    trainer = _trainer(tiny["sd"], tiny["data"], tmp_path / "run", finetune="full", objective="sft", max_train_steps=2,
                       checkpointing_steps=0)  # fmt: skip
    trainer.train()
    start = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet")
    pipe = trainer.pipeline()
    with outputs.base_context(trainer.run, pipe):
        base = pipe.unet
        assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), start.state_dict().values()))
    moved = max((a - b).abs().max().item() for a, b in zip(pipe.unet.parameters(), start.parameters()))
    assert moved > 0  # outside the context: the trained weights
    trainer.end()


# ---- non-finite losses and weights -------------------------------------------------------------------------------------


def _poison_second_step(trainer):
    calls = {"n": 0}
    step = trainer.step_fn

    def poisoned(batch, epoch):
        loss, metrics = step(batch, epoch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    trainer.step_fn = poisoned


def test_a_nonfinite_loss_stops_the_run_naming_the_step(tiny, tmp_path):
    trainer = _trainer(tiny["sd"], tiny["data"], tmp_path / "run")
    _poison_second_step(trainer)
    with pytest.raises(TrainingError, match="non-finite loss at step 2"):
        trainer.train()
    trainer.end()


def test_nonfinite_loss_skip_drops_the_update_and_counts_it(tiny, tmp_path):
    trainer = _trainer(tiny["sd"], tiny["data"], tmp_path / "run", nonfinite_loss="skip")
    _poison_second_step(trainer)
    summary = trainer.train()
    assert summary["skipped_nonfinite"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.unet.parameters())
    assert summary["history"][-1]["train/skipped_nonfinite"] == 1
    trainer.end()


def test_nonfinite_weights_are_never_exported(tiny, tmp_path):
    trainer = _trainer(tiny["sd"], tiny["data"], tmp_path / "run", max_train_steps=1, checkpointing_steps=0)
    trainer.train()
    with torch.no_grad():
        next(p for n, p in trainer.unet.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"lora_B.*NaN/inf.*nothing was exported"):
        trainer.export({})
    assert not (tmp_path / "run" / "lora").exists()
    trainer.end()


def test_an_evaluation_that_fails_loses_no_training(tiny, tmp_path, monkeypatch):
    """The weights are exported before the final evaluation runs, so an evaluation that fails (memory, a file) after
    a run without checkpoints leaves the trained LoRA and its model card; a run that evaluates rewrites the card with
    the result."""
    from diffalign.cli import run_training
    from diffalign.training.offline import OfflinePairsTrainer

    def broken(self):
        raise RuntimeError("the evaluation ran out of memory")

    out, RECIPE = tmp_path / "run", REPO / "configs" / "sandbox_dpo.yaml"  # noqa: N806
    argv = _args(tiny["sd"], tiny["data"], out, "--max_train_steps", "1", "--checkpointing_steps", "0",
                 "--skip_eval", "false", "--eval_num_prompts", "1", "--eval_seeds", "[0]", "--eval_steps", "1",
                 "--eval_reward", "sandbox-clip")  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(OfflinePairsTrainer, "evaluate", broken)
        with pytest.raises(RuntimeError, match="ran out of memory"):
            run_training(TrainConfig, "diffalign.training.offline:OfflinePairsTrainer", RECIPE, argv)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert not (out / "eval.json").exists() and '"eval": null' in (out / "README.md").read_text()
    run_training(TrainConfig, "diffalign.training.offline:OfflinePairsTrainer", RECIPE, argv)
    assert (out / "eval.json").is_file() and '"win_rate"' in (out / "README.md").read_text()


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def _scramble(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes with NaNs; the header still parses."""
    state = load_file(path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(path))


def test_corrupt_checkpoints_are_named_and_latest_falls_back(tiny, tmp_path):
    out = tmp_path / "run"
    _ok(_cli(_args(tiny["sd"], tiny["data"], out)))  # checkpoints 2 and 4
    _scramble(out / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    explicit = _cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "6", "--resume_from_checkpoint",
                          str(out / "checkpoint-4")))  # fmt: skip
    assert explicit.returncode == 1 and "Traceback" not in explicit.stderr
    assert "checkpoint-4/pytorch_lora_weights.safetensors is corrupt" in explicit.stderr
    latest = _ok(_cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "6", "--resume_from_checkpoint",
                            "latest")))  # fmt: skip
    assert "skipping checkpoint" in latest.stdout and "checkpoint-4" in latest.stdout
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in latest.stdout
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_latest_refuses_an_intact_checkpoint_of_other_settings_instead_of_overwriting_it(tiny, tmp_path):
    """Resuming ``latest`` with another LoRA rank: the checkpoints verify but do not load. Before, the run skipped
    them, started fresh and wrote its own checkpoint-2 and -4 over them; now it stops and leaves them as they were."""
    out = tmp_path / "run"
    _ok(_cli(_args(tiny["sd"], tiny["data"], out)))  # checkpoints 2 and 4
    before = {p.name: (p / "train_state.json").read_text() for p in out.glob("checkpoint-*")}
    proc = _cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "6", "--lora_rank", "2",
                      "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint {out / 'checkpoint-4'} is intact but does not load into this run" in proc.stderr
    assert {p.name: (p / "train_state.json").read_text() for p in out.glob("checkpoint-*")} == before


def test_a_resume_under_other_data_settings_says_it_is_not_a_continuation(tiny, tmp_path):
    """The checkpoint records the settings that decide which pairs a step draws; resuming with the same ones prints
    nothing, with another batch size it names the change (the restored position counts batches of the old size)."""
    out = tmp_path / "run"
    _ok(_cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "2")))
    state = json.loads((out / "checkpoint-2" / "train_state.json").read_text())
    assert state["settings"]["train_batch_size"] == 4 and state["settings"]["num_processes"] == 1
    same = _ok(_cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "3", "--resume_from_checkpoint",
                          "latest")))  # fmt: skip
    assert "resumed from" in same.stdout and "warning: resuming" not in same.stdout
    other = _ok(_cli(_args(tiny["sd"], tiny["data"], out, "--max_train_steps", "5", "--train_batch_size", "2",
                           "--resume_from_checkpoint", str(out / "checkpoint-2"))))  # fmt: skip
    line = next(x for x in other.stdout.splitlines() if x.startswith("warning: resuming"))
    assert "train_batch_size 4 -> 2" in line and "not an exact continuation" in line


def test_latest_without_a_checkpoint_says_it_starts_fresh(tiny, tmp_path):
    proc = _ok(_cli(_args(tiny["sd"], tiny["data"], tmp_path / "run", "--max_train_steps", "1",
                          "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest")))  # fmt: skip
    assert "no checkpoint in" in proc.stdout and "starting fresh" in proc.stdout


# ---- configuration mistakes: one line, before anything loads ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--checkpointing_steps", "-1"], "checkpointing_steps must be >= 0"),
        (["--betta", "3"], "'betta' is not a field (did you mean 'beta'?)"),
        (["--lr_scheduler", "cosin"], "lr_scheduler='cosin' is not valid"),
        (
            ["--loss_type", "hinge", "--label_smoothing", "0.1"],
            "label_smoothing=0.1 works only with loss_type sigmoid",
        ),
        (
            ["--objective", "ppo"],
            "objective='ppo' is not a known objective; choose one of ['ddpo', 'dpo', 'dreambooth', "
            "'dreambooth_prior', 'inpo', 'ppd', 'prdp', 'pso', 'pso_hinge', 'pso_online', 'pso_pairs', 'rpo', 'sft']",
        ),
        (
            ["--pretrained_model", "./no/such/model"],
            "pretrained_model='./no/such/model': no such local directory",
        ),
        (["--output_dir", "README.md"], "output_dir='README.md' is a file"),
        (  # the tests run with HF_HUB_OFFLINE=1
            ["--pretrained_model", "nobody/no-such-pipeline"],
            "pretrained_model='nobody/no-such-pipeline': not in the Hugging Face cache",
        ),
        (
            ["--resolution", "33"],
            "resolution=33 is not a multiple of 4, the downsampling factor of the VAE of 'sandbox': give a multiple "
            "of 4, e.g. 32 or 36",
        ),
        (["--max_train_steps", "many"], "--max_train_steps expects int, got 'many'"),
        (["--eval_reward", "sandbox-jduge"], "config field eval_reward: unknown reward 'sandbox-jduge'"),
        (
            ["--config", "configs/sandbox_dpo.yaml", "--objective", "ppd"],
            "objective 'ppd' ends with a per-user evaluation, which reads sandbox/users.json",
        ),
    ],
)
def test_config_mistakes_are_one_line_before_loading(extra, expected):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), *extra], env=ENV, capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("configuration error:") and expected in lines[0], (
        proc.stderr
    )
    imported = {x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")}
    assert "torch" not in imported and "diffusers" not in imported  # nothing heavy was loaded


def test_a_directory_that_is_not_a_pipeline_is_one_line(tmp_path):
    """A local directory without a pipeline's parts fails where the components load, in one line naming the field."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pretrained_model", str(tmp_path), "--output_dir",
                           str(tmp_path / "out")], env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("configuration error: config field pretrained_model: could not load the pipeline "
                           f"components from {str(tmp_path)!r}"), proc.stderr[-2000:]  # fmt: skip
    assert "Traceback" not in proc.stderr


def test_a_local_dataset_lacking_a_column_or_the_split_is_one_line_before_loading(tmp_path):
    """A local Pick-a-Pic-format directory whose train file lacks ``label_0``, that has no such split, or that lacks
    the evaluation's split, fails in the configuration check: one line naming the file (or the splits found), exit 2,
    neither torch nor diffusers imported (before this check the first failed after the model loaded, with a
    traceback, and the last only after the whole training, before the export)."""
    import pyarrow.parquet as pq

    from diffalign.sandbox import SANDBOX_DATA

    table = pq.read_table(Path(SANDBOX_DATA) / "data" / "train-00000-of-00001.parquet").slice(0, 8)
    (tmp_path / "data").mkdir()
    bad_file = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table.drop(["label_0"]), bad_file)
    cases = [
        ([], f"{bad_file} [train]: missing column 'label_0'"),
        (["--split", "validation"], "split 'validation' not found (splits found: train)"),
        (["--dataset", str(tmp_path / "data" / "*.parquet")], "missing column 'label_0'"),
        (["--dataset", str(tmp_path / "data" / "*.parket")], "no file matches this pattern"),
    ]
    (tmp_path / "good" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "good" / "data" / "train-00000-of-00001.parquet")
    cases.append(
        (["--dataset", str(tmp_path / "good")], "split 'test_unique' not found (splits found: train)")
    )
    for extra, expected in cases:
        proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--dataset", str(tmp_path), *extra,
                               "--output_dir", str(tmp_path / "out")], env=ENV, capture_output=True, text=True,
                              timeout=120, cwd=REPO)  # fmt: skip
        lines = [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("configuration error:") and expected in lines[0], lines[0]
        imported = {
            x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")
        }
        assert "torch" not in imported and "diffusers" not in imported


def test_parquet_files_as_the_dataset_train_but_cannot_name_the_evaluation_split(tmp_path):
    """Parquet files (a path or a glob) are one split: training reads them, and the final evaluation, whose prompts
    come from ``eval_split``, is refused in one line instead of silently scoring the training captions."""
    import pyarrow.parquet as pq

    from diffalign.sandbox import SANDBOX_DATA

    shard = Path(SANDBOX_DATA) / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 8), tmp_path / "a.parquet")
    for dataset in (str(tmp_path / "a.parquet"), str(tmp_path / "*.parquet")):
        with pytest.raises(ConfigError, match=r"names Parquet files, which are one split.*'test_unique'"):
            parse_config(
                TrainConfig, ["--dataset", dataset, "--output_dir", str(tmp_path / "o")]
            ).check_paths()
        cfg = parse_config(
            TrainConfig, ["--dataset", dataset, "--skip_eval", "true", "--output_dir", str(tmp_path)]
        )
        cfg.check_paths()  # training alone is fine


def test_bad_yaml_names_the_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("beta: [1\nlearning_rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line 2, column \d+: not valid YAML"):
        parse_config(TrainConfig, ["--config", str(y)])


def test_help_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and "--beta" in proc.stdout and "--objective" in proc.stdout
    imported = {x.split("|")[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")}
    assert "torch" not in imported


def test_debug_flag_shows_the_traceback():
    proc = _cli(["--objective", "ppo", "--debug"], timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_scheduler_names_match_diffusers():
    from diffusers.optimization import SchedulerType

    from diffalign.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}

"""Scripts whose input is another run's output still run with no arguments: they read the folders the sandbox
defaults write, and when one is missing they say in one line which command fills it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def output_dir(config: str) -> str:
    return yaml.safe_load((REPO / "configs" / config).read_text())["output_dir"]


def test_defaults_are_the_folders_the_sandbox_configs_write():
    assert script("eval_ppd").DEFAULT_RUN == REPO / output_dir("sandbox_ppd.yaml")
    online = script("plot_online").DEFAULT_RUNS
    assert online == {label: (output_dir(cfg), f"configs/{cfg}") for label, cfg in
                      (("prdp", "sandbox_prdp.yaml"), ("ddpo", "sandbox_ddpo.yaml"))}  # fmt: skip
    curves = script("plot_curves")
    assert list(curves.DEFAULT_RUNS.values()) == ["sandbox_dpo", "sandbox_inpo"]
    assert all((REPO / "configs" / f"{name}.yaml").is_file() for name in curves.DEFAULT_RUNS.values())


def test_eval_ppd_without_a_run_names_the_training_command(tmp_path, monkeypatch):
    module = script("eval_ppd")
    monkeypatch.setattr(module, "DEFAULT_RUN", tmp_path / "ppd-sandbox")
    with pytest.raises(
        SystemExit, match=r"ppd-sandbox: no PPD run there .*--config configs/sandbox_ppd.yaml"
    ):
        module.main([])


def test_plot_curves_defaults_to_dpo_against_inpo(tmp_path, monkeypatch):
    module = script("plot_curves")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"sandbox_dpo/multi_seed.json does not exist \(make it: python "
                       r"scripts/multi_seed.py --config configs/sandbox_dpo.yaml -- --eval_curve_steps"):  # fmt: skip
        module.main(["--out", str(tmp_path / "x.png")])
    for name, final in (("sandbox_dpo", 0.64), ("sandbox_inpo", 0.57)):
        folder = tmp_path / "outputs" / "multi-seed" / name
        folder.mkdir(parents=True)
        curve = [{"step": s, "mean_win_rate": w, "min_win_rate": w - 0.02, "max_win_rate": w + 0.02,
                  "mean_train_seconds": s / 2, "num_seeds": 3} for s, w in ((300, final - 0.03), (600, final))]  # fmt: skip
        (folder / "multi_seed.json").write_text(json.dumps({"curve": curve}))
    summary = module.main(["--out", str(tmp_path / "fig.png")])
    assert summary["baseline"] == "Diffusion-DPO" and summary["baseline_final_mean_win_rate"] == 0.64
    assert summary["first_step_reaching_baseline_final"] == {"Diffusion-DPO": 600, "InPO": None}
    assert (tmp_path / "fig.png").is_file()


def test_plot_online_script_plots_named_runs_and_defaults_to_the_sandbox_runs(tmp_path, monkeypatch):
    mod = script("plot_online")
    rows = [{"epoch": e, "train/reward_mean": 0.1 * e, "heldout/overall": 0.5} for e in range(4)]
    for d in ("outputs/prdp-sandbox", "outputs/ddpo-sandbox", "offline"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "outputs/prdp-sandbox/train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "offline/train_log.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.69}))
    monkeypatch.setattr(mod, "ROOT", tmp_path)

    # No runs named: the two sandbox configs' directories; a missing one names the command that fills it.
    with pytest.raises(SystemExit, match=r"ddpo-sandbox/train_log.jsonl.*--config configs/sandbox_ddpo.yaml"):
        mod.main(["--output", str(tmp_path / "none.png")])
    (tmp_path / "outputs/ddpo-sandbox/train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    out = mod.main(["--output", str(tmp_path / "default.png")])
    assert out.is_file() and out.stat().st_size > 5000

    # A log without online metrics is refused by name, not drawn as an empty panel.
    with pytest.raises(SystemExit, match=r"offline/train_log.jsonl: no 'train/reward_mean'"):
        mod.main([f"a={tmp_path / 'outputs/prdp-sandbox'}", f"b={tmp_path / 'offline'}", "--output", "x.png"])
    out = mod.main([f"a={tmp_path / 'outputs/prdp-sandbox'}", "--output", str(tmp_path / "named.png")])
    assert out.is_file()


def test_data_builders_default_to_the_folders_their_docs_name(monkeypatch):
    assert script("build_ppd_data").parse_args([]).output_dir == str(REPO / "outputs" / "sandbox-ppd")
    module = script("shuffle_labels")
    seen = {}

    def fake(source, out, splits, seed):
        seen.update(out=out, splits=splits, seed=seed)
        return {"splits": {}}

    monkeypatch.setattr(module, "shuffle_labels", fake)
    module.main([])
    assert seen == {"out": str(REPO / "outputs" / "sandbox-coin"), "splits": ["train"], "seed": 0}


def test_reward_agreement_defaults_to_the_shipped_pairs_and_counts_unreadable_ones(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.sandbox import SANDBOX_DATA

    module = script("eval_reward_agreement")
    out = module.main(["--rewards", "sandbox-clip", "--output", str(tmp_path / "a.json")])
    assert out["dataset"] == "sandbox" and out["split"] == "test" and out["skipped_pairs"] == 0
    assert (
        out["pairs"] == pq.read_metadata(Path(SANDBOX_DATA) / "data" / "test-00000-of-00001.parquet").num_rows
    )
    assert 0.5 < out["rewards"]["sandbox-clip"]["agreement"] <= 1.0  # the tiny CLIP ranks better than chance

    rows = pq.read_table(Path(SANDBOX_DATA) / "data" / "test-00000-of-00001.parquet").slice(0, 30).to_pylist()
    for i in (0, 7, 8):
        rows[i]["jpg_1" if i == 7 else "jpg_0"] = b"not an image"
    (tmp_path / "d" / "data").mkdir(parents=True)
    schema = pq.read_schema(Path(SANDBOX_DATA) / "data" / "test-00000-of-00001.parquet")
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), tmp_path / "d" / "data" / "test-00000-of-00001.parquet"
    )
    out = module.main(
        [str(tmp_path / "d"), "--rewards", "sandbox-clip", "--output", str(tmp_path / "b.json")]
    )
    assert out["skipped_pairs"] == 3 and out["pairs"] == 27


def test_dreambench_benchmark_defaults_to_the_sandbox_subjects():
    from diffalign.config import parse_config
    from diffalign.eval.dreambench import DreamBenchConfig, resolve_dreambench_dir

    cfg = parse_config(DreamBenchConfig, [])
    assert cfg.data == "sandbox"
    assert (resolve_dreambench_dir(cfg.data) / "dataset" / "prompts_and_classes.txt").is_file()


def test_every_script_reports_mistakes_in_one_line():
    """Each script's entry point goes through ``main_for_people``: a configuration error is one line and exit 2,
    not a traceback (``--debug`` shows it)."""
    entry = [
        p for p in sorted((REPO / "scripts").glob("*.py")) if 'if __name__ == "__main__":' in p.read_text()
    ]
    assert len(entry) >= 20
    bare = [p.name for p in entry if "main_for_people(" not in p.read_text()]  # direct, or through cli()
    assert not bare, f"scripts whose errors print a traceback: {bare}"

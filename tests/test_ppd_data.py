"""The PPD multi-user preference data (diffalign/data/ppd.py): the shipped sandbox pairs relabelled by the
simulated population. Small builds (the first ``SUBSET`` rows of each source split, seconds); the full default
build (about 45 s on a busy CPU) only under ``-m slow``."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.data import PickAPicPairs, load_pickapic_split, ppd
from diffalign.data.pickapic_rows import decode_jpeg
from diffalign.data.schema import PICKAPIC_COLUMN_NAMES, split_path
from diffalign.data.sources import resolve_dataset
from diffalign.sandbox import SANDBOX_DATA
from diffalign.sandbox.user_population import population, split_users

SUBSET = 80
K = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ppd") / "ds"
    return out, ppd.build_ppd_data(out, max_source_pairs=SUBSET, users_per_pair=K)


@pytest.fixture(scope="module")
def tables(built) -> dict:
    out, _ = built
    return {s: pq.read_table(split_path(out, s)).to_pylist() for s in ("train", "context")}


def test_same_seed_same_bytes(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    ppd.build_ppd_data(again, max_source_pairs=SUBSET, users_per_pair=K)
    files = [*(p.relative_to(out) for p in sorted((out / "data").iterdir())), Path("users.json")]
    files.append(Path(ppd.TEST_USERS_FILE))
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_users_come_from_split_users_and_are_disjoint(built, tables):
    out, report = built
    train_ids, unseen_ids = split_users(population())
    train_users = {r["user_id"] for r in tables["train"]}
    context_users = {r["user_id"] for r in tables["context"]}
    assert train_users <= set(train_ids)
    assert context_users == set(unseen_ids)
    assert not train_users & set(unseen_ids)
    assert set(ppd.load_test_prompts(out)) == set(unseen_ids)
    listed = {u["user_id"]: u["split"] for u in ppd.load_users(out)}
    assert listed == {**{i: "train" for i in train_ids}, **{i: "unseen" for i in unseen_ids}}
    assert (report["users"]["train"], report["users"]["unseen"]) == (192, 48)


def test_every_decided_pair_goes_to_distinct_balanced_users(built, tables):
    _, report = built
    users_of_pair = defaultdict(list)
    for r in tables["train"]:
        users_of_pair[r["image_0_uid"]].append(r["user_id"])
    assert all(len(u) == K and len(set(u)) == K for u in users_of_pair.values())
    assert len(users_of_pair) == report["splits"]["train"]["source_pairs_used"]
    counts = Counter(r["user_id"] for r in tables["train"])
    per_user = [counts.get(i, 0) for i in split_users(population())[0]]
    assert max(per_user) - min(per_user) <= 1
    ids = [r["ranking_id"] for r in tables["train"] + tables["context"]]
    shipped = [
        r for s in ppd.COPIED_SPLITS for r in pq.read_table(split_path(SANDBOX_DATA, s)).column("ranking_id")
    ]
    assert len(set(ids)) == len(ids) and not set(ids) & {int(x.as_py()) for x in shipped}


def test_train_labels_follow_the_assigned_users_scores(tables):
    """A hand computation with ``PopulationUser.score`` (its own analysis and judge) on the decoded JPEGs."""
    users = {u.user_id: u for u in population()}
    rows = tables["train"]
    delta = np.empty(len(rows))
    by_user = defaultdict(list)
    for i, r in enumerate(rows):
        by_user[r["user_id"]].append(i)
    for uid, idx in by_user.items():
        imgs = np.stack([decode_jpeg(rows[i][f"jpg_{s}"]) for s in (0, 1) for i in idx])
        caps = [rows[i]["caption"] for i in idx] * 2
        s = users[uid].score(imgs, caps)
        delta[idx] = s[: len(idx)] - s[len(idx) :]
    label_0 = np.array([r["label_0"] for r in rows])
    clear_0, clear_1 = delta > 0.1, delta < -0.1  # sigma(0.1 / 0.05) = 0.88
    assert clear_0.sum() >= 20 and clear_1.sum() >= 20
    assert label_0[clear_0].mean() > 0.8 and label_0[clear_1].mean() < 0.2
    ties = np.abs(delta) < 0.015
    assert np.all(label_0[ties] == 0.5) and np.all(label_0[~ties] != 0.5)
    for r in rows:
        best = r["image_0_uid"] if r["label_0"] == 1.0 else r["image_1_uid"] if r["label_1"] == 1.0 else ""
        assert r["best_image_uid"] == best and r["label_0"] + r["label_1"] == 1.0


def test_context_pairs_of_every_unseen_user(built, tables):
    out, report = built
    _, unseen_ids = split_users(population())
    for uid in unseen_ids:
        pairs = ppd.load_context_pairs(out, uid)
        assert len(pairs) >= 4 and len(pairs) == 8
        assert all(p["preferred"] != p["rejected"] for p in pairs)
    assert all(r["label_0"] in (0.0, 1.0) for r in tables["context"])
    validation = pq.read_table(split_path(SANDBOX_DATA, "validation")).slice(0, SUBSET)
    assert {r["image_0_uid"] for r in tables["context"]} <= set(validation.column("image_0_uid").to_pylist())
    first = tables["context"][0]
    pair = ppd.load_context_pairs(out, first["user_id"])[0]
    assert pair["preferred"] == (first["jpg_0"] if first["label_0"] == 1.0 else first["jpg_1"])
    assert report["splits"]["context"]["users_short"] == {}


def test_test_prompts_are_held_out_and_read_the_users_taste(built):
    out, report = built
    prompts = ppd.load_test_prompts(out)
    source_train = set(
        pq.read_table(split_path(SANDBOX_DATA, "train"), columns=["caption"]).column(0).to_pylist()
    )
    test_unique = set(
        pq.read_table(split_path(SANDBOX_DATA, "test_unique"), columns=["caption"]).column(0).to_pylist()
    )
    rows = json.loads((out / ppd.TEST_USERS_FILE).read_text())["rows"]
    assert all(len(c) == 8 and len(set(c)) == 8 for c in prompts.values())
    for caps in prompts.values():
        assert not set(caps) & source_train and set(caps) <= test_unique
    assert (
        report["splits"]["test_users"]["fallback_captions"]
        == sum(r["taste_coverage"] == 0 for r in rows)
        == 0
    )


def test_report_counts_add_up(built, tables):
    out, report = built
    train, context = report["splits"]["train"], report["splits"]["context"]
    assert (
        train["source_rows"] == SUBSET == train["source_pairs_used"] + sum(train["source_skipped"].values())
    )
    assert train["rows"] == K * train["source_pairs_used"] == len(tables["train"])
    assert train["user_ties_kept"] == sum(r["label_0"] == 0.5 for r in tables["train"])
    assert context["rows"] == len(tables["context"]) == 8 * 48 and context["skipped"]["user_tie"] >= 0
    assert report["splits"]["test_users"]["rows"] == 8 * 48
    for name, digest in report["source"]["sha256"].items():
        assert ppd._sha256(SANDBOX_DATA / name) == digest
    for s in ppd.COPIED_SPLITS:
        assert split_path(out, s).read_bytes() == split_path(SANDBOX_DATA, s).read_bytes()
    assert json.loads((out / ppd.REPORT_FILE).read_text())["splits"] == report["splits"]


def test_project_loader_reads_the_splits(built, tables, tmp_path):
    out, report = built
    pairs = PickAPicPairs(out, "train", resolution=32, cache_dir=str(tmp_path / "hf"), show_progress=False)
    assert len(pairs) == report["splits"]["train"]["rows"] - report["splits"]["train"]["user_ties_kept"]
    assert pairs.stats.skipped["tie"] == report["splits"]["train"]["user_ties_kept"]
    assert pairs[0]["user_id"] in split_users(population())[0]
    context = load_pickapic_split(out, "context", cache_dir=str(tmp_path / "hf"))
    assert context.column_names == list(PICKAPIC_COLUMN_NAMES) and context.num_rows == 8 * 48
    by_user = ppd.train_pairs_by_user(out)
    assert sum(len(v) for v in by_user.values()) == len(tables["train"])
    assert all(tables["train"][i]["user_id"] == uid for uid, idx in by_user.items() for i in idx)


def test_resolve_dataset_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ppd, "NAMED_BUILD", {"max_source_pairs": 12, "context_pairs_per_unseen_user": 2})
    calls = []
    real = ppd.build_ppd_data
    monkeypatch.setattr(ppd, "build_ppd_data", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = resolve_dataset("sandbox-ppd")
    second = resolve_dataset("sandbox-ppd")
    assert first == second and len(calls) == 1
    assert Path(first).parent == tmp_path / "cache" and Path(first).name.startswith("sandbox-ppd-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first).name]  # no temporary left over
    assert len(ppd.load_context_pairs("sandbox-ppd", split_users(population())[1][0])) == 2


def test_named_builds_resolve_to_their_own_cached_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ppd, "NAMED_BUILD", {"max_source_pairs": 12, "context_pairs_per_unseen_user": 2})
    two, six = resolve_dataset("sandbox-ppd"), resolve_dataset("sandbox-ppd-6u")
    assert two != six and Path(six).parent == tmp_path / "cache"
    reports = [json.loads((Path(d) / "build_report.json").read_text()) for d in (two, six)]
    assert [r["users_per_pair"] for r in reports] == [2, 6]
    rows = [len(pq.read_table(split_path(d, "train"))) for d in (two, six)]
    assert rows[1] == 3 * rows[0]
    assert resolve_dataset("sandbox-ppd-7u") == "sandbox-ppd-7u"  # not a named build: passed through
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sandbox-ppd-6u").mkdir()
    assert resolve_dataset("sandbox-ppd-6u") == "sandbox-ppd-6u"  # an existing directory of that name wins


def test_cache_root_convention(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFALIGN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ppd.cache_root() == tmp_path / "diffalign"
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "x"))
    assert ppd.cache_root() == tmp_path / "x"


def test_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        ppd.build_ppd_data(tmp_path)


def test_script_builds_a_small_dataset(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_ppd_data", Path(__file__).parents[1] / "scripts/build_ppd_data.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main(
        [
            "--output-dir",
            str(tmp_path / "ds"),
            "--max-source-pairs",
            "10",
            "--users-per-pair",
            "3",
            "--context-pairs",
            "1",
            "--no-progress",
        ]
    )
    assert report["splits"]["train"]["rows"] == 3 * report["splits"]["train"]["source_pairs_used"]
    assert "wall time" in capsys.readouterr().out


@pytest.mark.slow
def test_default_build_counts(tmp_path):
    report = ppd.build_ppd_data(tmp_path / "ds")
    train = report["splits"]["train"]
    assert (train["source_rows"], train["source_skipped"], train["rows"]) == (3509, {"tie": 324}, 6370)
    assert (train["rows_per_user"]["min"], train["rows_per_user"]["max"]) == (33, 34)
    assert report["splits"]["context"]["rows"] == report["splits"]["test_users"]["rows"] == 384


def test_every_named_build_passes_the_configs_path_check():
    """config.NAMED_DATASETS (checked before anything heavy is imported) must list every PPD build name, or a
    config naming a new build fails its pre-flight check as a missing directory."""
    from diffalign.config import NAMED_DATASETS, PPD_DATASETS

    assert set(ppd.NAMED_BUILDS) <= set(NAMED_DATASETS)
    assert set(ppd.NAMED_BUILDS) == set(PPD_DATASETS)  # the preflight's PPD check reads this list

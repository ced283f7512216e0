"""RPO's labels (diffalign/training/subject_pairs.py): ``label_0 = sigmoid(r_ref - r_gen)`` with the λ-Harmonic
reward at ``label_lambda``. λ 0 (the official code) scores text alone; a larger λ also counts how much an image looks
like the subject's references, which favours the references themselves: the labels move towards them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from diffalign.data.schema import split_path
from diffalign.eval.benchmark_models import load_base_pipeline
from diffalign.eval.dreambench import ClipEmbedder, load_dreambench, resolve_dreambench_dir
from diffalign.training.subject_pairs import SubjectPairsConfig, build_subject_pairs

CONTEXTS = ["a {0} {1} on the left", "a {0} {1} on a dark background", "a small {0} {1}"]


def test_labels_follow_label_lambda(tmp_path):
    subject = load_dreambench(resolve_dreambench_dir("sandbox")).subjects[0]
    pipe, clip = load_base_pipeline("sandbox"), ClipEmbedder.load("sandbox-clip", "cpu")
    labels, records = {}, {}
    for lam in (0.0, 0.7):
        cfg = SubjectPairsConfig(
            kind="rpo", num_generated=2, steps=4, label_lambda=lam, context_templates=CONTEXTS
        )
        out = tmp_path / f"lam{lam}"
        records[lam] = build_subject_pairs(subject, cfg, pipe, clip, out, "sandbox")
        table = pq.read_table(split_path(out, "train")).to_pydict()
        labels[lam] = np.array(table["label_0"])
        assert np.allclose(labels[lam] + np.array(table["label_1"]), 1.0)
        assert json.loads((out / "build.json").read_text()) == records[lam]  # what the run reads back
    # the same generated images (same seeds) on both sides: only the reward's λ differs
    assert not np.allclose(labels[0.0], labels[0.7])
    assert labels[0.7].mean() > labels[0.0].mean()
    for lam, rec in records.items():  # the build's record is the labels' own summary
        assert rec["label_mean"] == labels[lam].mean() and rec["config"]["label_lambda"] == lam

"""Prompt sets for benchmarks: Pick-a-Pic-schema splits, PartiPrompts (TSV) and HPSv2-style JSON files.

Every reader returns a :class:`PromptSet`: the prompts, one category per prompt (``None`` when the source has no
categories), and a record of what was read and what was dropped (empty rows, duplicates), so that nothing a user
gave disappears without a count.

Sources
-------
- **Pick-a-Pic schema** (``"sandbox"`` or a local Parquet directory, with ``split``): the split's unique captions in
  first-appearance order (``test_unique`` is the Pick-a-Pic protocol's 500 prompts). No categories.
- **PartiPrompts** (a ``.tsv`` with a header ``Prompt  Category  Challenge  Note``; Yu et al. 2022, 1,632 prompts):
  category = ``Category``; ``Challenge`` is kept in ``meta``. Read with quoting disabled: some prompts *start* with
  a double quote (``"G I G G L E" painted ...``) and a CSV reader would otherwise strip it.
- **HPSv2 benchmark style** (one JSON file per style, each a list of strings: ``anime.json``, ``concept-art.json``,
  ``paintings.json``, ``photo.json``): category = the file stem. A directory means all its ``*.json`` files.

Subsets (:func:`subset_prompts`): without categories the first ``n`` prompts (as the training evaluation does);
with categories a **stratified** sample: each category gets a share proportional to its size (largest-remainder
rounding, at least one prompt per category when ``n`` allows), drawn at random with a fixed seed inside the
category and kept in file order.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PARTI_COLUMNS = ("Prompt", "Category")


@dataclass
class PromptSet:
    """Prompts with optional categories.

    Attributes:
        prompts: the prompts, unique, in source order.
        categories: one category per prompt, or ``None`` for every prompt when the source has none.
        source: a human-readable description of where they came from (``"PartiPrompts.tsv"``, ``"sandbox:test_unique"``).
        meta: per-prompt extra fields (e.g. Parti's ``Challenge``), same length as ``prompts`` (may be empty dicts).
        dropped: counts of rows that were not used, by reason (``{"empty": 2, "duplicate": 5}``).
    """

    prompts: list[str]
    categories: list[str | None]
    source: str
    meta: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.categories) != len(self.prompts):
            raise ValueError(
                f"PromptSet: {len(self.prompts)} prompts but {len(self.categories)} categories (one per prompt)"
            )
        if not self.meta:
            self.meta = [{} for _ in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_categories(self) -> bool:
        return any(c is not None for c in self.categories)

    def category_counts(self) -> dict[str, int]:
        """Prompts per category, in first-appearance order (empty when there are no categories)."""
        return dict(Counter(c for c in self.categories if c is not None))

    def describe(self) -> str:
        """One line: source, count, categories, what was dropped."""
        text = f"{len(self)} prompts from {self.source}"
        if self.has_categories:
            text += f" in {len(self.category_counts())} categories"
        if any(self.dropped.values()):
            text += " (dropped: " + ", ".join(f"{v} {k}" for k, v in self.dropped.items() if v) + ")"
        return text

    def select(self, indices: list[int], source_suffix: str = "") -> PromptSet:
        """The prompts at ``indices`` (in that order)."""
        return PromptSet(
            [self.prompts[i] for i in indices],
            [self.categories[i] for i in indices],
            self.source + source_suffix,
            [self.meta[i] for i in indices],
            dict(self.dropped),
        )


def _dedupe(
    rows: list[tuple[str, str | None, dict]], source: str, dropped: dict[str, int] | None = None
) -> PromptSet:
    """Strip prompts, drop empty ones and repeats (first occurrence wins), count both."""
    dropped = dict(dropped or {})
    dropped.setdefault("empty", 0)
    dropped.setdefault("duplicate", 0)
    seen: set[str] = set()
    prompts, cats, meta = [], [], []
    for prompt, cat, extra in rows:
        p = (prompt or "").strip()
        if not p:
            dropped["empty"] += 1
            continue
        if p in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(p)
        prompts.append(p)
        cats.append(cat.strip() if isinstance(cat, str) and cat.strip() else None)
        meta.append(extra)
    return PromptSet(prompts, cats, source, meta, dropped)


# ---------------------------------------------------------------------------------------------------------------
# Readers


def read_parti_tsv(path: str | Path) -> PromptSet:
    """PartiPrompts: a tab-separated file with a header row holding at least ``Prompt`` and ``Category``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing (names the columns found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PartiPrompts file {path} not found (expected a .tsv with a Prompt column)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(
                f"{path}: the file is empty (expected a header row 'Prompt<TAB>Category<TAB>...')"
            )
        header = [h.strip() for h in header]
        if "Prompt" not in header:
            raise ValueError(f"{path}: no 'Prompt' column in the header (columns found: {header})")
        ip = header.index("Prompt")
        ic = header.index("Category") if "Category" in header else None
        extras = [(i, h) for i, h in enumerate(header) if h not in PARTI_COLUMNS and h]
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line at the end of the file: not a prompt row
            cells = {i: v for i, v in enumerate(row)}
            extra = {h: cells[i] for i, h in extras if cells.get(i)}
            rows.append((cells.get(ip, ""), cells.get(ic) if ic is not None else None, extra))
    return _dedupe(rows, path.name)


def read_hps_json(paths: str | Path | list[str | Path]) -> PromptSet:
    """HPSv2-style prompt files: each a JSON list of strings; the category is the file stem. A list of objects with a
    ``"caption"`` key (the prompt lists of the online PSO / D3PO code, e.g. ``4k_training_prompts.json``) is read too.

    ``paths`` is one file, a directory (all ``*.json`` in it, sorted), or a list of files.
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        source = p.name
    else:
        files = [Path(x) for x in paths]
        source = ",".join(f.name for f in files)
    if not files:
        raise FileNotFoundError(f"no *.json prompt files in {paths} (expected anime.json, photo.json, ...)")
    rows = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"HPS prompt file {f} not found")
        data = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(data, list) and data and all(isinstance(x, dict) and isinstance(x.get("caption"), str)
                                                   for x in data):  # fmt: skip
            data = [x["caption"] for x in data]
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(
                f"{f}: expected a JSON list of prompt strings (HPSv2 benchmark format) or of objects with a "
                f"'caption', got {type(data).__name__}"
                + (" with non-string items" if isinstance(data, list) else "")
            )
        rows += [(x, f.stem, {}) for x in data]
    return _dedupe(rows, source)


def read_pickapic_prompts(dataset: str, split: str) -> PromptSet:
    """Unique captions of a Pick-a-Pic-schema split (``"sandbox"`` = the shipped sandbox data).

    Raises:
        ValueError: the split does not exist, has no rows, or has no ``caption`` column
            (:func:`~diffalign.data.splits.split_captions`).
    """
    from ..data.sources import resolve_built_dataset
    from ..data.splits import split_captions

    captions = split_captions(resolve_built_dataset(dataset), split, name=dataset)
    name = f"{dataset}:{split}" if dataset == "sandbox" else f"{Path(dataset).name}:{split}"
    return _dedupe([(c, None, {}) for c in captions], name)


def load_prompt_set(spec: str, split: str = "test_unique") -> PromptSet:
    """Any supported source by its form: ``"sandbox"`` or a Parquet directory (with ``split``), a ``.tsv``
    (PartiPrompts), a ``.json`` file or a directory of ``*.json`` (HPSv2 style)."""
    p = Path(spec)
    if spec != "sandbox" and not p.exists():
        raise FileNotFoundError(
            f"prompt source {spec!r} not found: give 'sandbox', a Pick-a-Pic-schema Parquet directory, a "
            "PartiPrompts .tsv, or HPSv2-style .json file(s)/directory"
        )
    if p.suffix.lower() == ".tsv":
        return read_parti_tsv(p)
    if p.suffix.lower() == ".json" or (
        p.is_dir() and any(p.glob("*.json")) and not any(p.rglob("*.parquet"))
    ):
        return read_hps_json(p)
    return read_pickapic_prompts(spec, split)


# ---------------------------------------------------------------------------------------------------------------
# Subsets


def stratified_allocation(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many prompts each category gets out of ``n``: ``n · size / total`` rounded by largest remainder (ties
    broken by category order), then every empty category takes one from the largest allocation while ``n`` allows
    one per category. Never more than a category holds.

    E.g. sizes ``{a: 6, b: 3, c: 1}``, n = 5: quotas 3, 1.5, 0.5 → floors 3, 1, 0 with one left → b (remainder 0.5,
    first) → 3, 2, 0 → c gets one from a → ``{a: 2, b: 2, c: 1}``.
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    quota = {k: n * v / total for k, v in sizes.items()}
    alloc = {k: int(np.floor(q)) for k, q in quota.items()}
    left = n - sum(alloc.values())
    order = sorted(sizes, key=lambda k: -(quota[k] - alloc[k]))  # stable: ties keep category order
    for k in order[:left]:
        alloc[k] += 1
    if n >= len(sizes):
        for k in sizes:
            if alloc[k] == 0:
                donor = max(alloc, key=lambda j: alloc[j])
                alloc[donor] -= 1
                alloc[k] = 1
    return alloc


def subset_prompts(prompt_set: PromptSet, n: int | None, seed: int = 0) -> PromptSet:
    """At most ``n`` prompts: the first ``n`` without categories; a stratified sample with them (module docstring).
    ``None`` or ``n >= len`` returns the set unchanged."""
    if n is None or n >= len(prompt_set):
        return prompt_set
    if n < 1:
        raise ValueError(f"num_prompts must be >= 1, got {n}")
    if not prompt_set.has_categories:
        return prompt_set.select(list(range(n)), f" (first {n})")
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(prompt_set.categories):
        by_cat.setdefault(c if c is not None else "(none)", []).append(i)
    alloc = stratified_allocation({k: len(v) for k, v in by_cat.items()}, n)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k, idx in by_cat.items():
        if alloc[k]:
            chosen += [int(i) for i in rng.choice(idx, size=alloc[k], replace=False)]
    return prompt_set.select(sorted(chosen), f" (stratified sample of {n}, seed {seed})")

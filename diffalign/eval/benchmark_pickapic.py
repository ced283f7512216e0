"""The Pick-a-Pic-protocol benchmark: base vs aligned on a prompt set, same prompts and same seeds, several rewards.

Protocol (Wallace et al. 2023, Diffusion-DPO; Kirstain et al. 2023, Pick-a-Pic)
--------------------------------------------------------------------------------
1. Prompts: a Pick-a-Pic-schema split (``test_unique``: 500 prompts), PartiPrompts (1,632) or the HPSv2 benchmark
   (4 styles × 800), optionally a (stratified) subset (:mod:`diffalign.eval.prompts`).
2. Every prompt is sampled with the same ``S`` seeds (``seed, seed + 1, ..., seed + S − 1``) by the base and by the
   aligned model: row ``(prompt p, seed s)`` starts from the same initial noise on both sides
   (:func:`diffalign.eval.compare.generate`).
3. Every reward scores every image. The unit of comparison is the **prompt**: a prompt's score is the mean over
   its ``S`` seeds, ``a_p`` (aligned) and ``b_p`` (base).
4. Per reward: mean ± 95% Student-t interval of ``b_p`` and of ``a_p`` over prompts; the paired win rate
   ``(wins + ties / 2) / P`` of ``a_p`` over ``b_p`` with its 95% Wilson interval and the sign-test p-value
   (:func:`diffalign.eval.stats.paired_win_rate`); the same per category when the prompts have categories.

A reward that cannot score a prompt set is **skipped with its reason**, never a crash: the sandbox judge understands
only captions of the sandbox grammar, so on PartiPrompts (2 of whose 1,632 prompts happen to parse: "a circle", "a red
circle") it is skipped while CLIP rewards still run. The rule: a reward that can score less than
``min_supported_share`` (default 50%) of the prompts is skipped; above that it scores the prompts it can and
reports how many it left out. A reward that raises ``ValueError`` while scoring (e.g. the judge on images that are
not 32×32) is skipped with the error message.

Outputs (``output_dir``): ``results.json`` (everything below, NaN written as null), ``results.md`` (tables),
``scores.jsonl`` (one line per (prompt, seed): category and every reward's base/aligned score), ``win_rate.png``,
``win_rate_by_category.png`` (with categories) and ``index.html`` (summary + image pairs with scores, winner marked).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import _help
from .benchmark_models import SamplingConfig, apply_variant, load_base_pipeline, resolve_variant
from .compare import expand_prompts, generate
from .html import ImagePair, html_table, write_pairs_report
from .plots import plot_category_win_rates, plot_win_rates
from .prompts import PromptSet, load_prompt_set, subset_prompts
from .report import markdown_table
from .stats import mean_ci, paired_win_rate

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Where a sandbox run's aligned LoRA usually is (first found wins) when --aligned is not given.
DEFAULT_ALIGNED = ("outputs/dpo-sandbox/lora", "demo/assets/sandbox-dpo-lora")


@dataclass
class PickapicBenchmarkConfig(SamplingConfig):
    """Settings of :func:`run_pickapic_benchmark` (the script's flags have the same names)."""

    prompts: str = _help(
        "prompt source: 'sandbox' (sandbox data), a Pick-a-Pic-schema Parquet dir, a PartiPrompts .tsv, or "
        "HPSv2-style .json file / directory of them",
        "sandbox",
    )
    split: str = _help("split of a Pick-a-Pic-schema source", "test_unique")
    num_prompts: int | None = _help(
        "at most this many prompts (stratified over categories when there are any)", None
    )
    prompt_seed: int = _help("seed of the stratified prompt subset", 0)
    base: str = _help("base model: 'sandbox' or a diffusers pipeline directory", "sandbox")
    aligned: str | None = _help(
        "aligned model: LoRA dir, UNet dir, pipeline dir, training run dir or checkpoint-N; 'base' = the base "
        "itself, 'sandbox-early' = the sandbox's early UNet; default: the sandbox DPO LoRA when present",
        None,
    )
    rewards: list[str] = _help(
        "comma-separated catalog names or manifest paths", ["sandbox-judge", "sandbox-clip"]
    )
    images_per_prompt: int = _help("images (seeds) per prompt, identical for base and aligned", 2)
    seed: int = _help("first seed: a prompt's rows use seed, seed + 1, ...", 0)
    tie_tol: float = _help("|aligned - base| <= tie_tol counts as a tie", 1e-6)
    min_supported_share: float = _help(
        "skip a reward that can score less than this share of the prompts (the sandbox judge on non-sandbox "
        "captions); above it, the reward scores the prompts it can and the others are counted",
        0.5,
    )
    html_pairs: int = _help("image pairs shown in index.html (first seed of prompts spread over the set)", 48)
    output_dir: str = _help(
        "where results.json, results.md, plots and index.html go", "outputs/benchmark-pickapic"
    )

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or left out for all), got {self.num_prompts}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.min_supported_share <= 1.0:
            raise ValueError(f"min_supported_share must be in [0, 1], got {self.min_supported_share}")
        if not self.rewards:
            raise ValueError("give at least one reward (--rewards sandbox-clip,...)")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images_per_prompt)]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_aligned(repo_root: Path | None = None) -> str:
    """The sandbox DPO LoRA (``outputs/dpo-sandbox/lora`` or ``demo/assets/sandbox-dpo-lora``) when present."""
    from ..sandbox import REPO_ROOT

    root = repo_root or REPO_ROOT
    for rel in DEFAULT_ALIGNED:
        if (root / rel).is_dir():
            return str(root / rel)
    raise FileNotFoundError(
        "no --aligned model given and no sandbox DPO LoRA found at "
        + " or ".join(str(root / r) for r in DEFAULT_ALIGNED)
        + ": train one with `python scripts/train_diffusion_dpo.py`, or pass --aligned DIR (or --aligned base)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Rewards


def needs_sandbox_grammar(name: str) -> bool:
    """Whether a catalog reward (or manifest) scores only sandbox-grammar captions: the judge, or a combination
    containing it."""
    from ..rewards.catalog import load_manifest

    if name == "sandbox-judge":
        return True
    try:
        m = load_manifest(name)
    except ValueError:
        return False
    if m["kind"] == "sandbox_judge":
        return True
    if m["kind"] == "combined":
        return any(needs_sandbox_grammar(c["reward"]) for c in m["params"].get("components", []))
    return False


def supported_prompts(name: str, prompts: list[str]) -> tuple[np.ndarray, str | None]:
    """``(mask [P], example)``: which prompts the reward can score, and one prompt it cannot (for the message)."""
    if not needs_sandbox_grammar(name):
        return np.ones(len(prompts), dtype=bool), None
    from ..sandbox.captions import parse_caption

    mask = np.ones(len(prompts), dtype=bool)
    example = None
    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except ValueError:
            mask[i] = False
            example = example or p
    return mask, example


def reward_applicability(
    spec: str, prompts: list[str], min_share: float = 0.5
) -> tuple[np.ndarray, str | None, str | None]:
    """``(mask [P], example, reason)``: the prompts the reward can score, one it cannot, and why the reward is
    skipped (``None`` when it runs: at least ``min_share`` of the prompts are scorable)."""
    mask, example = supported_prompts(spec, prompts)
    if mask.mean() >= min_share:
        return mask, example, None
    what = "none" if not mask.any() else f"only {int(mask.sum())}"
    reason = (
        f"cannot score this prompt set: {what} of the {len(prompts)} prompts are sandbox-grammar captions "
        f"({example!r} is not; the sandbox judge only understands captions like 'a red circle'); a reward is skipped "
        f"when it can score less than {min_share:.0%} of the prompts (--min-supported-share)"
    )
    return mask, example, reason


def reward_label(spec: str) -> str:
    """How a reward is named in the outputs: its catalog name, or a manifest file's stem."""
    p = Path(spec)
    return p.stem if p.suffix in (".yaml", ".yml", ".json") else spec


def primary_key(name: str, scores: dict[str, np.ndarray]) -> str:
    """The score a reward is compared on: ``overall``, else the reward's own name, else its only output."""
    for key in ("overall", name, Path(name).stem):
        if key in scores:
            return key
    if len(scores) == 1:
        return next(iter(scores))
    raise KeyError(f"reward {name!r}: cannot tell its main score among {sorted(scores)}")


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def per_prompt(values: np.ndarray, num_seeds: int) -> np.ndarray:
    """``[P · S]`` prompt-major rows → ``[P]`` per-prompt means over seeds (NaN only if every seed is NaN)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, num_seeds)
    if not np.isnan(v).any():
        return v.mean(axis=1)
    # rows that are all NaN stay NaN ("mean of empty slice" is expected there)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        out = np.nanmean(v, axis=1)
    return out


def compare_scores(
    base: np.ndarray,
    aligned: np.ndarray,
    categories: list[str | None],
    *,
    tie_tol: float,
) -> dict:
    """Statistics of per-prompt scores ``[P]`` (NaN = not scored): means with CIs, win rate, per category."""
    keep = np.isfinite(base) & np.isfinite(aligned)
    b, a = base[keep], aligned[keep]
    if keep.sum() == 0:
        raise ValueError("no prompt has a finite score on both sides")
    out = {
        "num_prompts": int(keep.sum()),
        "base": mean_ci(b),
        "aligned": mean_ci(a),
        "win_rate": paired_win_rate(a, b, tie_tol=tie_tol),
        "categories": {},
    }
    cats = [c for c, k in zip(categories, keep) if k]
    if any(c is not None for c in cats):
        for cat in dict.fromkeys(c for c in cats if c is not None):
            idx = np.array([c == cat for c in cats])
            out["categories"][cat] = {
                "n": int(idx.sum()),
                "base_mean": float(b[idx].mean()),
                "aligned_mean": float(a[idx].mean()),
                "win_rate": paired_win_rate(a[idx], b[idx], tie_tol=tie_tol),
            }
    return out


def score_side(
    fn: Callable, images: np.ndarray, prompts: list[str], mask_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Score the rows in ``mask_rows``; others get NaN. ``{aspect: [N]}``."""
    idx = np.flatnonzero(mask_rows)
    raw = fn(images[idx], [prompts[i] for i in idx])
    out = {}
    for k, v in raw.items():
        full = np.full(len(prompts), np.nan)
        full[idx] = np.asarray(v, dtype=np.float64)
        out[k] = full
    return out


def _json_safe(x):
    """NaN/inf → None, numpy scalars → Python (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Report text


def _ci(m: dict) -> str:
    if m["ci_low"] is None or not math.isfinite(m["ci_low"]):
        return f"{m['mean']:.4f}"
    return f"{m['mean']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def _wr(w: dict) -> str:
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"


def summary_rows(results: dict) -> tuple[list[str], list[list]]:
    header = [
        "reward",
        "prompts",
        "base mean [95% CI]",
        "aligned mean [95% CI]",
        "win rate aligned [95% CI]",
        "W/T/L",
        "sign-test p",
    ]
    rows = []
    for name, r in results["rewards"].items():
        if r["status"] != "ok":
            rows.append([name, "skipped (see reason)", "-", "-", "-", "-", "-"])
            continue
        w = r["win_rate"]
        rows.append(
            [
                name,
                r["num_prompts"],
                _ci(r["base"]),
                _ci(r["aligned"]),
                _wr(w),
                f"{w['wins']}/{w['ties']}/{w['losses']}",
                f"{w['p_value']:.3g}",
            ]
        )
    return header, rows


def category_rows(r: dict) -> tuple[list[str], list[list]]:
    header = ["category", "prompts", "base mean", "aligned mean", "win rate aligned [95% CI]"]
    rows = [
        [cat, c["n"], c["base_mean"], c["aligned_mean"], _wr(c["win_rate"])]
        for cat, c in r["categories"].items()
    ]
    return header, rows


def format_markdown(results: dict) -> str:
    """The results as Markdown: settings, the summary table, per-aspect and per-category tables, skipped rewards."""
    s = results["settings"]
    lines = [
        "# Pick-a-Pic-protocol benchmark",
        "",
        f"- prompts: {results['prompt_set']}",
        f"- base: `{s['base']}`; aligned: {results['aligned_model']}",
        f"- {s['images_per_prompt']} image(s) per prompt, seeds {results['seeds']} (identical for both sides), "
        f"{s['steps']} steps, guidance {s['guidance']}",
        "- win rate: per prompt (seeds averaged), ties count half; 95% Wilson interval; means with 95% Student-t "
        "intervals over prompts",
        "",
    ]
    header, rows = summary_rows(results)
    lines += [markdown_table(header, rows), ""]
    for name, r in results["rewards"].items():
        if r["status"] != "ok":
            continue
        if r.get("skipped_prompts"):
            lines.append(
                f"- `{name}` scored {r['num_prompts']} prompts and could not score {r['skipped_prompts']} "
                f"(e.g. {r['unsupported_example']!r})"
            )
        if r["aspects"]:
            lines += ["", f"## {name}: aspects", ""]
            lines.append(
                markdown_table(
                    [
                        "aspect",
                        "prompts",
                        "base mean [95% CI]",
                        "aligned mean [95% CI]",
                        "win rate aligned [95% CI]",
                    ],
                    [
                        [k, v["num_prompts"], _ci(v["base"]), _ci(v["aligned"]), _wr(v["win_rate"])]
                        for k, v in r["aspects"].items()
                    ],
                )
            )
        if r["categories"]:
            lines += ["", f"## {name}: per category", ""]
            lines.append(markdown_table(*category_rows(r)))
    skipped = {n: r for n, r in results["rewards"].items() if r["status"] != "ok"}
    if skipped:
        lines += ["", "## Skipped rewards", ""]
        lines += [f"- `{n}`: {r['reason']}" for n, r in skipped.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_pickapic_benchmark(cfg: PickapicBenchmarkConfig, prompt_set: PromptSet | None = None) -> dict:
    """Run the benchmark (module docstring) and write its outputs; returns the ``results.json`` content.

    ``prompt_set`` overrides ``cfg.prompts`` (for callers that built their own).
    """
    from .protocol import reward_score_fn

    t0 = time.time()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)

    # ---- prompts ------------------------------------------------------------------------------------------------
    full = prompt_set if prompt_set is not None else load_prompt_set(cfg.prompts, cfg.split)
    ps = subset_prompts(full, cfg.num_prompts, cfg.prompt_seed)
    print(f"prompts: {ps.describe()}")
    seeds = cfg.seeds
    rows_p, rows_s = expand_prompts(ps.prompts, seeds)
    S = len(seeds)
    rows_cat = [c for c in ps.categories for _ in seeds]

    # ---- rewards: load first (a missing weight file fails before minutes of sampling) ---------------------------
    rewards: dict[str, dict] = {}
    for spec in cfg.rewards:
        name = reward_label(spec)
        mask, example, reason = reward_applicability(spec, ps.prompts, cfg.min_supported_share)
        if reason:
            rewards[name] = {"status": "skipped", "reason": reason}
            print(f"[skip] reward {name}: {reason}")
            continue
        rewards[name] = {"fn": reward_score_fn(spec), "mask": mask, "example": example}

    # ---- generation ---------------------------------------------------------------------------------------------
    aligned_spec = cfg.aligned if cfg.aligned is not None else default_aligned()
    variant = resolve_variant(aligned_spec)
    pipe = load_base_pipeline(cfg.base, device, DTYPES[cfg.dtype])
    gen_kw = cfg.generate_kwargs()
    print(f"sampling {len(rows_p)} images per side ({len(ps)} prompts x {S} seeds) on {device}")
    base_images = generate(pipe, rows_p, rows_s, desc="base", **gen_kw)
    with apply_variant(pipe, variant) as aligned_pipe:
        aligned_images = generate(aligned_pipe, rows_p, rows_s, desc=f"aligned ({variant.kind})", **gen_kw)

    # ---- scoring ------------------------------------------------------------------------------------------------
    results_rewards: dict[str, dict] = {}
    per_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, r in tqdm(rewards.items(), desc="scoring", leave=False):
        if r.get("status") == "skipped":
            results_rewards[name] = r
            continue
        mask_rows = np.repeat(r["mask"], S)
        try:
            b = score_side(r["fn"], base_images, rows_p, mask_rows)
            a = score_side(r["fn"], aligned_images, rows_p, mask_rows)
        except ValueError as err:
            results_rewards[name] = {
                "status": "skipped",
                "reason": f"cannot score these images/prompts: {err}",
            }
            print(f"[skip] reward {name}: {results_rewards[name]['reason']}")
            continue
        key = primary_key(name, b)
        stats = compare_scores(
            per_prompt(b[key], S), per_prompt(a[key], S), ps.categories, tie_tol=cfg.tie_tol
        )
        aspects = {}
        for k in b:
            if k == key:
                continue
            bp, ap = per_prompt(b[k], S), per_prompt(a[k], S)
            if (np.isfinite(bp) & np.isfinite(ap)).sum() >= 2:
                st = compare_scores(bp, ap, [None] * len(bp), tie_tol=cfg.tie_tol)
                st.pop("categories")
                aspects[k] = st
        results_rewards[name] = {
            "status": "ok",
            "primary": key,
            **stats,
            "skipped_prompts": int((~r["mask"]).sum()),
            "unsupported_example": r["example"],
            "aspects": aspects,
        }
        per_image[name] = (b[key], a[key])

    results = {
        "benchmark": "pickapic-protocol",
        "prompt_set": ps.describe(),
        "prompt_source": ps.source,
        "num_prompts": len(ps),
        "seeds": seeds,
        "aligned_model": variant.describe(),
        "settings": {**asdict(cfg), "device": device},
        "rewards": results_rewards,
        "seconds": round(time.time() - t0, 1),
    }

    # ---- outputs ------------------------------------------------------------------------------------------------
    files = write_outputs(
        results, out_dir, ps, rows_p, rows_s, rows_cat, base_images, aligned_images, per_image, cfg
    )
    print(format_markdown(results))
    print("outputs:\n  " + "\n  ".join(f"{k}: {v}" for k, v in files.items()))
    return results


def write_outputs(
    results: dict,
    out_dir: Path,
    ps: PromptSet,
    rows_p: list[str],
    rows_s: list[int],
    rows_cat: list[str | None],
    base_images: np.ndarray,
    aligned_images: np.ndarray,
    per_image: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: PickapicBenchmarkConfig,
) -> dict[str, Path]:
    """results.json, results.md, scores.jsonl, the plots and index.html; returns ``{what: path}``."""
    files: dict[str, Path] = {}
    files["results.json"] = out_dir / "results.json"
    files["results.json"].write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    files["results.md"] = out_dir / "results.md"
    files["results.md"].write_text(format_markdown(results))
    files["scores.jsonl"] = out_dir / "scores.jsonl"
    with files["scores.jsonl"].open("w") as f:
        for i, (p, s, c) in enumerate(zip(rows_p, rows_s, rows_cat)):
            row = {"prompt": p, "category": c, "seed": s}
            row.update({n: {"base": b[i], "aligned": a[i]} for n, (b, a) in per_image.items()})
            f.write(json.dumps(_json_safe(row)) + "\n")
    ok = {n: r for n, r in results["rewards"].items() if r["status"] == "ok"}
    plots: dict[str, Path] = {}
    if ok:
        plots["Win rate per reward"] = plot_win_rates(
            {n: r["win_rate"] for n, r in ok.items()},
            out_dir / "win_rate.png",
            title=f"Aligned vs base, {results['num_prompts']} prompts\n{results['prompt_source']}",
        )
        files["win_rate.png"] = plots["Win rate per reward"]
        by_cat = {
            n: {c: v["win_rate"] for c, v in r["categories"].items()}
            for n, r in ok.items()
            if r["categories"]
        }
        if by_cat:
            plots["Win rate per category"] = plot_category_win_rates(
                by_cat, out_dir / "win_rate_by_category.png"
            )
            files["win_rate_by_category.png"] = plots["Win rate per category"]
    # image pairs: the first seed of up to html_pairs prompts spread evenly over the set
    S = len(results["seeds"])
    P = len(ps)
    chosen = np.unique(np.linspace(0, P - 1, num=min(cfg.html_pairs, P)).round().astype(int)) if P else []
    pairs = []
    for p in chosen:
        i = int(p) * S
        scores = {n: (float(b[i]), float(a[i])) for n, (b, a) in per_image.items() if np.isfinite(b[i])}
        pairs.append(ImagePair(rows_p[i], rows_s[i], base_images[i], aligned_images[i], scores, rows_cat[i]))
    header, rows = summary_rows(results)
    summary = "<h2>Summary</h2>" + html_table(header, rows)
    footer = "".join(
        f"<h2>{n}: per category</h2>" + html_table(*category_rows(r))
        for n, r in ok.items()
        if r["categories"]
    )
    notes = [
        f"Prompts: {results['prompt_set']}. Base: {cfg.base}. Aligned: {results['aligned_model']}.",
        f"{S} image(s) per prompt with seeds {results['seeds']}, identical for base and aligned; "
        "win rate per prompt (seeds averaged), ties half, 95% Wilson interval.",
    ]
    notes += [f"Skipped {n}: {r['reason']}" for n, r in results["rewards"].items() if r["status"] != "ok"]
    files["index.html"] = write_pairs_report(
        out_dir / "index.html",
        title="Pick-a-Pic-protocol benchmark: base vs aligned",
        summary_html=summary,
        pairs=pairs,
        primary=next(iter(per_image), None),
        notes=notes,
        tie_tol=cfg.tie_tol,
        extra_images=plots,
        footer_html=footer,
    )
    return files

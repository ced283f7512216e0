"""Evaluation of personalised preference tuning (PPD, issue #13): given a few pairs of a user it never saw, does the
model make images *that user* prefers, more than the model it started from (and more than a generic one)?

Protocol, per unseen user of a sandbox-ppd build (:mod:`diffalign.data.ppd`):

- tokens ``[N, D]`` = ``encoder.embed`` of the user's first ``k`` context pairs (the few examples a new user gives);
- **personalised** images: the run's pipeline, LoRA on, the tokens in every row
  (``cross_attention_kwargs={"user_tokens": [B, N, D], "user_scale": s}``), on the user's own test captions x seeds;
- **base** images: the same pipeline with the adapters disabled and no tokens, i.e. the starting model, bit for bit
  (the user branch is the stock attention without tokens). They depend on (caption, seed) only, so one image serves
  every user with that caption and a cache dict (``base_images``) carries them between calls;
- **branch off**: the same pipeline, LoRA on, no tokens: what the run's LoRA does alone. Personalised against it
  is the direct test that the tokens carry the user's taste (an embedding that carries none scores 0.5 or less,
  however well the LoRA does against the base or a generic run);
- **against** (optional): a second pipeline, e.g. a generic Diffusion-DPO LoRA that sees no user;
- every image is scored by THAT user's score (``overall + strength * taste``,
  :meth:`~diffalign.sandbox.user_population.PopulationUser.score_analyses`), each image analysed and judged once;
  the users come from the build's ``users.json``, so a build with another population is scored by its own users.

Every side uses the same per-row seeded noise (:func:`~diffalign.eval.compare.generate`'s rule), so a personalised
image and its base twin differ only by the LoRA and the tokens.

``eval.json`` (the common format of :mod:`diffalign.eval.protocol`, "aligned" = personalised)::

    primary "user_score", reward "population-user", num_prompts (= (user, prompt) units), num_images_per_side,
    seeds_per_prompt, win_rate {win_rate, ci_low, ci_high, n, wins, ties, losses, confidence, p_value, mean_diff,
    method}: over all (user, prompt) units, seeds averaged in a unit, ties (|diff| <= 1e-6) half, Wilson 95% CI;
    aspects {judge aspects..., overall, user_score: {base: mean_ci, aligned: mean_ci}} over all images;
    per_user [{user_id, kind, strength, win_rate, ci_low, ci_high, n, wins, ties, losses, p_value,
               mean_user_score {base, aligned}}];
    mean_user_win_rate, min_user_win_rate, max_user_win_rate (each user weighs the same);
    vs_branch_off: the same blocks with "base" = the branch-off images, plus branch_off_vs_base;
    vs_against (only with ``against``): the same blocks with "base" = the against pipeline, plus against_vs_base;
    images [{user_id, prompt, seed, user_score {personalized, base, branch_off[, against]}}]: every per-image score, so any
    number above can be recomputed; k, user_scale, user_ids, dataset, split, steps, guidance, seeds, encoder, files.

Also :func:`user_retrieval` (is the embedding of a user's pairs 0..k-1 nearest to the embedding of the same user's
pairs k..2k-1?); interpolation between users: :mod:`diffalign.eval.personal_interpolation`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.ppd import (
    CONTEXT_SPLIT,
    NAMED_BUILDS,
    load_context_pairs,
    load_test_prompts,
    load_users,
    named_build_dir,
)
from ..errors import ConfigError
from ..sandbox.judge import Judge, analyze, parse_prompts
from ..sandbox.user_population import COMPONENT_NAMES, PopulationUser
from .compare import adapters_disabled, expand_prompts, generate, per_prompt_mean
from .report import labelled_grid, markdown_table
from .stats import mean_ci, paired_win_rate

TIE_TOL = 1e-6  # as compare(): score differences this small are ties
REWARD_NAME = "population-user"
PRIMARY = "user_score"


# ---------------------------------------------------------------------------------------------------------------
# Loading


def resolve_ppd_dir(data_dir: str | Path) -> Path:
    """A build directory; a named build (``"sandbox-ppd"``, ``"sandbox-ppd-6u"``) resolves (and builds once) to the
    cached one. Resolved once here so the many reads of an evaluation do not each hash the source files."""
    built = named_build_dir(data_dir)
    if built is not None:
        return built
    path = Path(data_dir)
    if not (path / "users.json").is_file():
        raise ConfigError(
            f"{path / 'users.json'} not found: give a sandbox-ppd build directory or 'sandbox-ppd'"
        )
    return path


def population_users(data_dir: str | Path) -> dict[int, PopulationUser]:
    """``{user id: PopulationUser}`` rebuilt from the build's ``users.json`` (weights, strength, kind)."""
    out = {}
    for u in load_users(data_dir):
        weights = tuple(float(u["weights"][c]) for c in COMPONENT_NAMES)
        out[int(u["user_id"])] = PopulationUser(
            int(u["user_id"]), weights, float(u["strength"]), str(u["kind"])
        )
    return out


def unseen_user_ids(data_dir: str | Path) -> list[int]:
    """The build's unseen users (``split == "unseen"``) that have test captions, sorted."""
    with_prompts = set(load_test_prompts(data_dir))
    return sorted(
        int(u["user_id"])
        for u in load_users(data_dir)
        if u["split"] == "unseen" and u["user_id"] in with_prompts
    )


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    return path


def _lora_dir(run_dir: Path) -> Path:
    """``run_dir/lora`` (a training run) or ``run_dir`` itself when it holds the LoRA file."""
    for d in (run_dir / "lora", run_dir):
        if (d / "pytorch_lora_weights.safetensors").is_file():
            return d
    raise ConfigError(f"{run_dir / 'lora' / 'pytorch_lora_weights.safetensors'}: LoRA weights not found")


def _pipeline(model_path: str | Path, lora: Path, device: str | torch.device, dtype: torch.dtype):
    from .benchmark_models import load_base_pipeline

    pipe = load_base_pipeline(str(model_path), device=device, dtype=dtype)  # offline, progress bars off
    pipe.load_lora_weights(str(lora))
    return pipe


def load_personalized(
    model_path: str | Path,
    run_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """``(pipe, encoder)`` of a PPD run: the base pipeline (``"sandbox"`` or a directory) with the run's ``lora/``
    and ``user_attention.safetensors`` installed, and its ``user_encoder/``. Every file is checked before a model
    loads; a missing one raises a one-line :class:`ConfigError` naming it."""
    from ..models.user_attention import load_user_attention
    from ..models.user_encoder import UserEncoder

    run = _require(Path(run_dir), "PPD run directory")
    lora = _lora_dir(run)
    attention = _require(run / "user_attention.safetensors", "user attention weights")
    _require(run / "user_encoder" / "user_encoder.json", "user encoder config")
    _require(run / "user_encoder" / "user_projector.safetensors", "user encoder weights")
    pipe = _pipeline(model_path, lora, device, dtype)
    # installed after the LoRA, so that loading adapters cannot replace the processors
    load_user_attention(pipe.unet, attention)
    return pipe, UserEncoder.load(run / "user_encoder", device=device)


def load_generic(
    model_path: str | Path,
    run_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The pipeline of a generic (user-blind) LoRA run, e.g. Diffusion-DPO: ``run_dir/lora`` or a LoRA directory."""
    return _pipeline(model_path, _lora_dir(_require(Path(run_dir), "run directory")), device, dtype)


def _run_config(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_context_split(run_dir: str | Path) -> str:
    """The split a PPD run reads its users' context from: its ``user_context_split`` (``config.json``), else
    ``"context"`` (the paper's random pairs; also for a run directory without a config)."""
    return _run_config(run_dir).get("user_context_split") or CONTEXT_SPLIT


def run_dataset(run_dir: str | Path, default: str = "sandbox-ppd") -> str:
    """The data a PPD run trained on (``dataset`` of its ``config.json``) when that is a PPD build (a named build,
    or a directory with ``users.json``), else ``default``: its unseen users are the ones to evaluate on."""
    name = str(_run_config(run_dir).get("dataset") or "")
    if name in NAMED_BUILDS or (name and (Path(name) / "users.json").is_file()):
        return name
    return default


def run_user_scale(run_dir: str | Path) -> float:
    """The user branch's scale a PPD run trained with (``user_scale`` of its ``config.json``), else 1.0."""
    return float(_run_config(run_dir).get("user_scale", 1.0))


def user_tokens(
    encoder: Any, data_dir: str | Path, user_id: int, k: int, start: int = 0, split: str = CONTEXT_SPLIT
) -> torch.Tensor:
    """``[N, D]`` tokens of pairs ``start .. start + k - 1`` of one user in ``split`` (no gradient)."""
    pairs = load_context_pairs(data_dir, user_id, split)
    if len(pairs) < start + k:
        raise ConfigError(
            f"user {user_id} has {len(pairs)} pairs in the {split!r} split of {data_dir}; {start + k} are needed"
        )
    with torch.no_grad():
        return encoder.embed(
            [(p["caption"], p["preferred"], p["rejected"]) for p in pairs[start : start + k]]
        )


# ---------------------------------------------------------------------------------------------------------------
# Generation and scoring


def generate_personalized(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    tokens: torch.Tensor,
    *,
    steps: int = 20,
    guidance: float = 5.0,
    batch_size: int = 64,
    user_scale: float = 1.0,
    desc: str = "personalised",
) -> np.ndarray:
    """:func:`~diffalign.eval.compare.generate` with user tokens: ``tokens`` ``[N, D]`` (every row) or ``[R, N, D]``
    (one per row, so one batch can hold several users). Each batch of ``B`` rows gets its ``[B, N, D]`` tokens: the
    UNet's ``2B`` classifier-free-guidance rows get row ``i % B``, so both halves of a row see its user."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must have the same length")
    rows = tokens.unsqueeze(0).expand(len(prompts), *tokens.shape) if tokens.dim() == 2 else tokens
    if rows.shape[0] != len(prompts):
        raise ValueError(
            f"{rows.shape[0]} token rows for {len(prompts)} prompts; give [N, D] or one row per prompt"
        )
    rows = rows.to(pipe.unet.device, pipe.unet.dtype)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        p = list(prompts[i : i + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        kwargs = {"user_tokens": rows[i : i + batch_size], "user_scale": float(user_scale)}
        images = pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np",
                      cross_attention_kwargs=kwargs).images  # fmt: skip
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out, axis=0)


def base_context(pipe: Any) -> contextlib.AbstractContextManager:
    """The starting model: adapters disabled when the UNet has any (a pipeline without LoRA is its own base)."""
    from ..models.lora import has_lora

    return adapters_disabled(pipe) if has_lora(pipe.unet) else contextlib.nullcontext()


def _cached_images(
    pipe: Any, pairs: Sequence[tuple[str, int]], cache: dict | None, *, context: Any, desc: str, **gen: Any
) -> np.ndarray:
    """Images of unique ``(prompt, seed)`` rows without user tokens, generated once per
    ``(prompt, seed, steps, guidance)`` key of ``cache`` (None: no reuse)."""
    cache = {} if cache is None else cache
    key = lambda p, s: (p, int(s), int(gen["steps"]), float(gen["guidance"]))  # noqa: E731
    todo = [(p, s) for p, s in pairs if key(p, s) not in cache]
    if todo:
        with context:
            made = generate(pipe, [p for p, _ in todo], [s for _, s in todo], desc=desc, **gen)
        for (p, s), im in zip(todo, made, strict=True):
            cache[key(p, s)] = im
    return np.stack([cache[key(p, s)] for p, s in pairs])


def _judge(images: np.ndarray, prompts: Sequence[str]) -> tuple[list, list, dict[str, np.ndarray]]:
    """``(analyses, specs, judge scores)``: each image analysed once, then scored for any number of users."""
    analyses = [analyze(im) for im in images]
    specs = parse_prompts(list(prompts), len(images))
    return analyses, specs, Judge().score_analyses(analyses, specs)


def _score(
    images: np.ndarray, prompts: Sequence[str], row_of: Sequence[int], row_users: Sequence[PopulationUser]
) -> dict[str, np.ndarray]:
    """Per row: the judge's aspects and ``user_score`` of image ``row_of[r]`` under ``row_users[r]``."""
    analyses, specs, judged = _judge(images, prompts)
    idx = np.asarray(row_of, dtype=np.int64)
    out = {name: np.asarray(v, dtype=np.float64)[idx] for name, v in judged.items()}
    scores = np.empty(len(idx))
    for uid in dict.fromkeys(u.user_id for u in row_users):
        rows = [r for r, u in enumerate(row_users) if u.user_id == uid]
        j = idx[rows]
        user = row_users[rows[0]]
        scores[rows] = user.score_analyses(
            [analyses[i] for i in j], [specs[i] for i in j], out["overall"][rows]
        )
    out[PRIMARY] = scores
    return out


def _comparison(
    aligned: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    rows: Sequence[tuple[int, str, int]],
    users: Mapping[int, PopulationUser],
) -> dict[str, Any]:
    """Win rate of ``aligned`` over ``base`` overall and per user, aspects, mean of per-user win rates."""
    units = [(u, p) for u, p, _ in rows]
    a, b = np.asarray(aligned[PRIMARY]), np.asarray(base[PRIMARY])
    out: dict[str, Any] = {
        "primary": PRIMARY,
        "num_prompts": len(dict.fromkeys(units)),
        "num_images_per_side": len(rows),
        "win_rate": paired_win_rate(per_prompt_mean(a, units), per_prompt_mean(b, units), tie_tol=TIE_TOL),
        "aspects": {},
    }
    for name in base:
        bv, av = np.asarray(base[name], dtype=np.float64), np.asarray(aligned[name], dtype=np.float64)
        # the judge's per-attribute scores are NaN where a caption leaves the attribute open
        keep = ~(np.isnan(bv) | np.isnan(av))
        if keep.sum() >= 2:
            out["aspects"][name] = {"base": mean_ci(bv[keep]), "aligned": mean_ci(av[keep])}
    per_user = []
    for uid in dict.fromkeys(u for u, _, _ in rows):
        r = [i for i, (u, _, _) in enumerate(rows) if u == uid]
        keys = [rows[i][1] for i in r]
        wr = paired_win_rate(per_prompt_mean(a[r], keys), per_prompt_mean(b[r], keys), tie_tol=TIE_TOL)
        keep = ("win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "p_value")
        user = users[uid]
        per_user.append({"user_id": uid, "kind": user.kind, "strength": user.strength, **{k: wr[k] for k in keep},
                         "mean_user_score": {"base": float(b[r].mean()), "aligned": float(a[r].mean())}})  # fmt: skip
    rates = [p["win_rate"] for p in per_user]
    out.update(per_user=per_user, mean_user_win_rate=float(np.mean(rates)), min_user_win_rate=float(min(rates)),
               max_user_win_rate=float(max(rates)))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate_personal(
    pipe: Any,
    encoder: Any,
    data_dir: str | Path,
    *,
    user_ids: Sequence[int] | None = None,
    k: int = 4,
    seeds: Sequence[int] = (0,),
    steps: int = 20,
    guidance: float = 5.0,
    batch_size: int = 64,
    output_dir: str | Path,
    against: Any = None,
    user_scale: float = 1.0,
    num_prompts: int | None = None,
    base_images: dict | None = None,
    against_images: dict | None = None,
    filename: str = "eval.json",
    grid_users: int = 4,
    context_split: str = CONTEXT_SPLIT,
) -> dict[str, Any]:
    """Personalised vs base (and vs ``against``) for each unseen user on its own captions, scored by that user
    (module docstring: protocol and JSON layout). ``user_ids``: default every unseen user of the build;
    ``num_prompts``: the first N test captions of each user (default all). ``base_images`` / ``against_images``:
    dicts the caller keeps to reuse user-blind images between calls (keyed by prompt, seed, steps, guidance).
    Writes ``output_dir/<filename>``, ``per_user.md`` and ``samples.png``; returns the ``eval.json`` dict."""
    data_dir = resolve_ppd_dir(data_dir)
    users = population_users(data_dir)
    unseen = unseen_user_ids(data_dir)
    ids = unseen if user_ids is None else [int(u) for u in user_ids]
    bad = [u for u in ids if u not in unseen]
    if bad or not ids:
        raise ConfigError(
            f"user ids {bad or ids} are not unseen users of {data_dir} (they are {unseen[:5]}...)"
        )
    prompts_of = load_test_prompts(data_dir)
    seeds = [int(s) for s in seeds]
    rows: list[tuple[int, str, int]] = []
    tokens: dict[int, torch.Tensor] = {}
    for uid in ids:
        tokens[uid] = user_tokens(encoder, data_dir, uid, k, split=context_split)
        ps, ss = expand_prompts(prompts_of[uid][:num_prompts] if num_prompts else prompts_of[uid], seeds)
        rows += [(uid, p, s) for p, s in zip(ps, ss, strict=True)]
    gen = {"steps": steps, "guidance": guidance, "batch_size": batch_size}
    row_prompts, row_seeds = [p for _, p, _ in rows], [s for _, _, s in rows]
    row_users = [users[u] for u, _, _ in rows]
    row_tokens = torch.stack([tokens[u] for u, _, _ in rows])
    personal = generate_personalized(pipe, row_prompts, row_seeds, row_tokens, user_scale=user_scale, **gen)
    index = {ps: i for i, ps in enumerate(dict.fromkeys(zip(row_prompts, row_seeds, strict=True)))}
    pairs = list(index)  # the user-blind sides: one image per (prompt, seed), whichever users share it
    row_of = [index[ps] for ps in zip(row_prompts, row_seeds, strict=True)]
    base = _cached_images(pipe, pairs, base_images, context=base_context(pipe), desc="base", **gen)
    pair_prompts = [p for p, _ in pairs]
    # LoRA on, no tokens: the user branch is the stock attention without them (the run's LoRA alone)
    off = _cached_images(pipe, pairs, None, context=contextlib.nullcontext(), desc="branch off", **gen)
    scores = {
        "personalized": _score(personal, row_prompts, range(len(rows)), row_users),
        "base": _score(base, pair_prompts, row_of, row_users),
        "branch_off": _score(off, pair_prompts, row_of, row_users),
    }
    sides = {"personalized": personal, "base": base[row_of]}
    if against is not None:
        other = _cached_images(
            against, pairs, against_images, context=contextlib.nullcontext(), desc="against", **gen
        )
        scores["against"] = _score(other, pair_prompts, row_of, row_users)
        sides["against"] = other[row_of]

    result = _comparison(scores["personalized"], scores["base"], rows, users)
    result.update(
        reward=REWARD_NAME, seeds_per_prompt=len(seeds), dataset=str(data_dir), split="test_users", k=int(k),
        context_split=context_split, user_scale=float(user_scale), user_ids=ids, num_users=len(ids), steps=steps, guidance=guidance, seeds=seeds,
        encoder=_describe_encoder(encoder),
    )  # fmt: skip
    result["vs_branch_off"] = _comparison(scores["personalized"], scores["branch_off"], rows, users)
    result["vs_branch_off"]["branch_off_vs_base"] = _comparison(
        scores["branch_off"], scores["base"], rows, users
    )["win_rate"]
    if against is not None:
        result["vs_against"] = _comparison(scores["personalized"], scores["against"], rows, users)
        against_vs_base = _comparison(scores["against"], scores["base"], rows, users)["win_rate"]
        result["vs_against"]["against_vs_base"] = against_vs_base
    result["images"] = [
        {"user_id": u, "prompt": p, "seed": s, PRIMARY: {n: float(v[PRIMARY][i]) for n, v in scores.items()}}
        for i, (u, p, s) in enumerate(rows)
    ]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = {"eval": filename, "per_user": "per_user.md", "grid": "samples.png"}
    (out / "per_user.md").write_text(per_user_markdown(result) + "\n", encoding="utf-8")
    _grid(sides, rows, ids[:grid_users]).save(out / "samples.png")
    (out / filename).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _describe_encoder(encoder: Any) -> dict[str, Any]:
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # a stub encoder in a test has neither
        info["config"] = encoder.config()
        info["digest"] = encoder.digest()
    return info


def _grid(
    sides: Mapping[str, np.ndarray], rows: Sequence[tuple[int, str, int]], ids: Sequence[int], cols: int = 4
):
    """Per user: a base row, a personalised row (and an against row) over its first captions at the first seed."""
    from PIL import Image

    first_seed = rows[0][2]
    order = [n for n in ("base", "personalized", "against") if n in sides]
    blocks = []
    for uid in ids:
        r = [i for i, (u, _, s) in enumerate(rows) if u == uid and s == first_seed][:cols]
        labels = [f"personalised for {uid}" if n == "personalized" else n for n in order]
        images = np.concatenate([sides[n][r] for n in order])
        blocks.append(labelled_grid(images, labels, [rows[i][1] for i in r], scale=3))
    canvas = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        canvas.paste(b, (0, y))
        y += b.height
    return canvas


def per_user_markdown(result: Mapping[str, Any]) -> str:
    """One row per user: win rate vs base with its CI (and vs against), mean user scores."""
    against = {p["user_id"]: p for p in result.get("vs_against", {}).get("per_user", [])}
    header = ["user", "kind", "n", "win rate vs base", "95% CI", "W/T/L", "score base", "score personalised"]
    header += ["win rate vs against"] if against else []
    rows = []
    for p in result["per_user"]:
        row = [
            p["user_id"],
            p["kind"],
            p["n"],
            p["win_rate"],
            f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]",
            f"{p['wins']}/{p['ties']}/{p['losses']}",
            p["mean_user_score"]["base"],
            p["mean_user_score"]["aligned"],
        ]
        rows.append(row + ([against[p["user_id"]]["win_rate"]] if against else []))
    return markdown_table(header, rows)


def format_personal(result: Mapping[str, Any]) -> str:
    """A readable summary of :func:`evaluate_personal`'s result."""
    wr = result["win_rate"]
    lines = [
        f"personalised vs base, each image scored by its own user ({result['num_users']} unseen users, "
        f"{result['num_prompts']} (user, prompt) units x {result['seeds_per_prompt']} seeds, k={result['k']}): "
        f"win rate {wr['win_rate']:.3f} [95% CI {wr['ci_low']:.3f}, {wr['ci_high']:.3f}] "
        f"(wins {wr['wins']}, ties {wr['ties']}, losses {wr['losses']})",
        f"mean per-user win rate {result['mean_user_win_rate']:.3f} "
        f"(min {result['min_user_win_rate']:.3f}, max {result['max_user_win_rate']:.3f})",
    ]
    for key, side, label in (
        (
            "vs_branch_off",
            "branch_off",
            "branch off (the LoRA alone, no tokens: does the embedding carry taste?)",
        ),
        ("vs_against", "against", "against"),
    ):
        if key in result:
            v, w = result[key], result[key]["win_rate"]
            lines.append(
                f"personalised vs {label}: win rate {w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}], "
                f"mean per-user {v['mean_user_win_rate']:.3f}; {side.replace('_', ' ')} vs base "
                f"{v[side + '_vs_base']['win_rate']:.3f}"
            )
    aspects = [
        [name, v["base"]["mean"], v["aligned"]["mean"], v["aligned"]["mean"] - v["base"]["mean"]]
        for name, v in result["aspects"].items()
        if not name.startswith("pf/")
    ]
    lines.append(markdown_table(["aspect", "base", "personalised", "change"], aspects))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Retrieval and interpolation


def user_retrieval(
    encoder: Any,
    data_dir: str | Path,
    user_ids: Sequence[int] | None = None,
    k: int = 4,
    splits: tuple[str, str] = (CONTEXT_SPLIT, CONTEXT_SPLIT),
) -> dict[str, Any]:
    """Does the encoder tell users apart? Each user is embedded twice, from its pairs ``0..k-1`` of ``splits[0]``
    and from pairs of ``splits[1]`` (``k..2k-1`` when it is the same split, so the two sets are disjoint; else
    ``0..k-1``); a user is retrieved when the nearest second-set embedding (cosine over the flattened tokens) to its
    first-set embedding is its own. Chance is ``1 / num_users``.

    ``top1_accuracy_reverse`` matches the other way: each second-set embedding among every user's first-set ones.
    With ``splits[0] == "questionnaire"`` every candidate then read the *same* 4 pairs and differs only by its
    answers, so the match cannot ride on which images a user happened to see (the forward direction compares
    candidates read from different images, whose content dominates the tokens)."""
    data_dir = resolve_ppd_dir(data_dir)
    ids = unseen_user_ids(data_dir) if user_ids is None else [int(u) for u in user_ids]
    if len(ids) < 2:
        raise ConfigError(f"retrieval needs at least two users, got {ids}")
    start = k if splits[0] == splits[1] else 0
    first = torch.stack(
        [user_tokens(encoder, data_dir, u, k, split=splits[0]).flatten().float().cpu() for u in ids]
    )
    second = torch.stack(
        [
            user_tokens(encoder, data_dir, u, k, start=start, split=splits[1]).flatten().float().cpu()
            for u in ids
        ]
    )
    sim = torch.nn.functional.normalize(first, dim=1) @ torch.nn.functional.normalize(second, dim=1).T
    nearest = sim.argmax(dim=1)
    hit = nearest == torch.arange(len(ids))
    hit_reverse = sim.argmax(dim=0) == torch.arange(len(ids))
    off = ~torch.eye(len(ids), dtype=torch.bool)
    return {
        "k": int(k),
        "splits": list(splits),
        "num_users": len(ids),
        "user_ids": ids,
        "top1_accuracy": float(hit.float().mean()),
        "top1_accuracy_reverse": float(hit_reverse.float().mean()),
        "chance": 1.0 / len(ids),
        "same_user_cosine": float(sim.diagonal().mean()),
        "different_user_cosine": float(sim[off].mean()),
        "nearest": {str(u): ids[int(j)] for u, j in zip(ids, nearest, strict=True)},
    }


__all__ = [
    "base_context",
    "evaluate_personal",
    "format_personal",
    "generate_personalized",
    "load_generic",
    "load_personalized",
    "per_user_markdown",
    "population_users",
    "resolve_ppd_dir",
    "run_context_split",
    "run_user_scale",
    "unseen_user_ids",
    "user_retrieval",
    "user_tokens",
]

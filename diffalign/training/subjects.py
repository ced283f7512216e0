"""Per-subject training over a DreamBench directory: DreamBooth or RPO on the offline core, one model per subject.

For each subject: build its pairs (:mod:`diffalign.training.subject_pairs`: reference images + images the base generates),
train with the offline trainer (:class:`~diffalign.training.offline.OfflinePairsTrainer`, the same loop as
Diffusion-DPO: the objective and the data are what differ), and write the model where
``scripts/benchmark_dreambench.py --subject_models`` reads it (``<output_dir>/<subject>/`` holds the LoRA, or the UNet
of a full fine-tuning). It runs as one process (``python scripts/train_subjects.py``).

Checkpoint selection by λ (RPO, as in the official code): with ``select_every`` N > 0 the run is trained in segments
of N steps (exact resume between them) and every segment's weights are scored on the validation prompts with the
λ-Harmonic reward; for each λ of ``select_lambdas`` the best one goes to ``<output_dir>/lambda-<λ>/<subject>/``.
Labels are built with ``label_lambda`` (official: 0), so one training run serves every λ.

The YAML is a training config (any :class:`~diffalign.config.TrainConfig` field) plus the ``subject_*`` keys of
:class:`SubjectRunConfig`; the command line overrides both (``--subject_select_every 40``, ``--learning_rate 1e-4``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import _help
from ..errors import ConfigError


@dataclass
class SubjectRunConfig:
    """The per-subject driver's own settings (YAML keys and flags with the ``subject_`` prefix)."""

    data: str = _help("DreamBench directory; 'sandbox' = the shipped sandbox subjects", "sandbox")
    subjects: list[str] | None = _help("subject names (default: every subject with images)", None)
    output_dir: str = _help("one model per subject is written to <output_dir>/<subject>/", "outputs/subjects")
    unique_token: str = _help("identifier token ({0} in the templates)", "sks")
    instance_template: str = _help("the reference images' prompt, formatted (token, class)", "a {0} {1}")
    class_template: str = _help("DreamBooth's class prompt, formatted (token, class)", "a {1}")
    context_prompts: str | None = _help(
        "file of context templates, one per line ({0} token, {1} class); default: the DreamBench directory's "
        "training_prompts.txt, else the official RPO list",
        None,
    )
    validation_prompts: str | None = _help(
        "file of validation templates for checkpoint selection; default: validation_prompts.txt, else the official",
        None,
    )
    num_generated: int = _help("images the base generates per context prompt", 4)
    label_lambda: float = _help("λ of the labels' λ-Harmonic reward (official RPO: 0)", 0.0)
    select_every: int = _help("checkpoint selection: score the weights every N steps (0: keep the last)", 0)
    select_lambdas: list[float] = _help("λ values to select checkpoints for (lambda-<λ>/ per value)", [0.5])
    select_seeds: list[int] = _help("seeds per validation prompt in checkpoint selection", [0, 1, 2, 3])
    clip: str | None = _help("CLIP for labels and selection (default: sandbox-clip / clip-vit-l14)", None)
    eval: bool = _help(
        "end with the DreamBench protocol on base and trained models (eval/ and <model set>/eval.json)", True
    )
    eval_images_per_prompt: int = _help("images per evaluation prompt (DreamBench: 4)", 4)
    dino: str | None = _help(
        "DINO backbone of the evaluation (default: sandbox stand-in / dino-vits16)", None
    )
    steps: int = _help("sampling steps for generated images", 20)
    guidance: float = _help("guidance for generated images", 5.0)


# The official RPO lists (andrew-miao/RPO utils.py), used for real DreamBench directories without their own files.
OFFICIAL_TRAINING_TEMPLATES = (
    "a {0} {1} in Vincent Van Gogh rendition",
    "a {0} {1} on the Moon",
    "a green {0} {1}",
    "a {0} {1} with a China Great Wall in the background",
    "a {0} {1} on top of wooden roof",
    "a {0} {1} with the Statue of Liberty in the background",
    "a {0} {1} with a volcano in the background",
    "a {0} {1} on a subway platform",
)
OFFICIAL_VALIDATION_TEMPLATES = ("a {0} {1} in a beautiful garden", "a {0} {1} at the beach during sunset")

PREFIX = "subject_"


def split_argv(yaml_data: dict, argv: list[str]) -> tuple[SubjectRunConfig, dict, list[str]]:
    """``(driver config, training YAML without subject_* keys, training argv without --subject_* flags)``.

    A ``--subject_<name>`` flag takes the words up to the next flag (``--subject_select_lambdas 0.3 0.5``); values are
    converted and checked as every config field is (:func:`diffalign.config.from_dict`)."""
    import typing

    from ..config import _convert, from_dict, normalise_flags

    hints = typing.get_type_hints(SubjectRunConfig)
    own = {k[len(PREFIX) :]: v for k, v in yaml_data.items() if k.startswith(PREFIX)}
    train_yaml = {k: v for k, v in yaml_data.items() if not k.startswith(PREFIX)}
    for k in own:
        if k not in hints:
            raise ConfigError(f"config key {PREFIX}{k} is not a subject setting; valid: {sorted(hints)}")
    rest: list[str] = []
    argv, i = normalise_flags(argv), 0
    while i < len(argv):
        a, i = argv[i], i + 1
        if not a.startswith("--" + PREFIX):
            rest.append(a)
            continue
        name, vals = a[2 + len(PREFIX) :], []
        while i < len(argv) and not argv[i].startswith("--"):
            vals.append(argv[i])
            i += 1
        if name not in hints:
            raise ConfigError(f"unknown flag {a}; the subject_* settings are {sorted(hints)}")
        try:
            own[name] = _convert(PREFIX + name, hints[name], ",".join(vals))
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return from_dict(SubjectRunConfig, own, "subject settings"), train_yaml, rest


def _templates(path: str | None, default_file: Path, official: tuple[str, ...]) -> list[str]:
    p = Path(path) if path else default_file
    if p.is_file():
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not lines:
            raise ConfigError(f"{p} holds no templates (one per line, e.g. 'a {{0}} {{1}} on the beach')")
        return lines
    if path:
        raise ConfigError(f"template file {path} not found")
    return list(official)


def run_subjects(cfg: SubjectRunConfig, train_yaml: dict, train_argv: list[str]) -> dict:
    """Train (and select) one model per subject; returns and writes ``<output_dir>/subjects.json``."""
    import torch
    import yaml

    from ..eval.benchmark_models import load_base_pipeline
    from ..eval.dreambench import (
        ClipEmbedder,
        backbone_names,
        dataset_dir,
        load_dreambench,
        resolve_dreambench_dir,
    )
    from .subject_pairs import SubjectPairsConfig, build_subject_pairs

    t0 = time.time()
    root = resolve_dreambench_dir(cfg.data)
    data = load_dreambench(root, cfg.subjects)
    ddir = dataset_dir(root)
    objective = train_yaml.get("objective", "dpo")
    if "--objective" in train_argv:
        objective = train_argv[train_argv.index("--objective") + 1]
    from ..objectives.registry import get_objective, subject_objectives

    spec = get_objective(objective)
    if spec.subject_pairs is None:
        raise ConfigError(
            f"scripts/train_subjects.py trains subject-driven objectives ({subject_objectives()}), not {objective!r}"
        )
    base = train_yaml.get("pretrained_model", "sandbox")
    if "--pretrained_model" in train_argv:
        base = train_argv[train_argv.index("--pretrained_model") + 1]
    contexts = _templates(cfg.context_prompts, ddir / "training_prompts.txt", OFFICIAL_TRAINING_TEMPLATES)
    validation = _templates(
        cfg.validation_prompts, ddir / "validation_prompts.txt", OFFICIAL_VALIDATION_TEMPLATES
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    yaml_path = out / "train_config.yaml"
    yaml_path.write_text(yaml.safe_dump(train_yaml, sort_keys=False))

    # the training flags are parsed (and a mistyped one refused) before the base model draws any image
    _max_steps(_train_argv(yaml_path, train_argv, out / "runs" / "<subject>"))
    if cfg.select_every < 0:
        raise ConfigError(f"subject_select_every must be >= 0, got {cfg.select_every}")
    _check_backbones(cfg, base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_base_pipeline(base, device)
    clip = ClipEmbedder.load(backbone_names(base, cfg.clip)[0], device)
    pairs_cfg = SubjectPairsConfig(
        kind="rpo" if spec.subject_pairs == "context" else "dreambooth",
        unique_token=cfg.unique_token,
        instance_template=cfg.instance_template,
        class_template=cfg.class_template,
        num_generated=cfg.num_generated,
        label_lambda=cfg.label_lambda,
        steps=cfg.steps,
        guidance=cfg.guidance,
        context_templates=contexts,
    )
    summary: dict[str, Any] = {
        "objective": objective,
        "data": str(root),
        "settings": asdict(cfg),
        "subjects": {},
    }
    for subject in data.subjects:
        s_dir = out / "runs" / subject.name
        record = build_subject_pairs(subject, pairs_cfg, pipe, clip, s_dir / "pairs", str(base))
        candidates = _train(subject, cfg, yaml_path, train_argv, s_dir, record)
        chosen = _select(subject, cfg, candidates, validation, pipe, clip)
        for lam, info in chosen.items():
            dest = (out / f"lambda-{lam:g}" if cfg.select_every else out) / subject.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(
                info["weights"], dest
            )  # the LoRA (pytorch_lora_weights.safetensors) or the full UNet
            (dest / "selection.json").write_text(json.dumps(info, indent=2))
        summary["subjects"][subject.name] = {"pairs": record, "candidates": candidates, "selected": chosen}
    if cfg.eval:
        sets = [out / f"lambda-{lam:g}" for lam in cfg.select_lambdas] if cfg.select_every else [out]
        summary["eval"] = _evaluate(cfg, root, base, [s.name for s in data.subjects], sets, out / "eval")
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "subjects.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(
    subject, cfg: SubjectRunConfig, yaml_path: Path, train_argv: list[str], s_dir: Path, record
) -> list[dict]:
    """Train one subject; returns the candidate weights ``[{step, weights}]`` (one per segment)."""
    from ..cli import run_training
    from ..config import TrainConfig

    del record
    run_dir = s_dir / "run"
    # a fresh run every time: a checkpoint left by an earlier run would be taken for this run's latest one
    for stale in (run_dir, s_dir / "candidates"):
        if stale.exists():
            shutil.rmtree(stale)
    argv = _train_argv(yaml_path, train_argv, s_dir)
    total = _max_steps(argv)
    every = cfg.select_every or total
    stops = list(range(every, total + 1, every))
    if not stops or stops[-1] != total:
        stops.append(total)
    candidates = []
    for k, stop in enumerate(stops):
        seg = [*argv, "--max_train_steps", str(stop), "--checkpointing_steps", str(every)]
        if k > 0:
            seg += ["--resume_from_checkpoint", "latest"]
        run_training(TrainConfig, "diffalign.training.offline:OfflinePairsTrainer", yaml_path, seg)
        keep = s_dir / "candidates" / f"step-{stop}"
        if keep.exists():
            shutil.rmtree(keep)
        exported = run_dir / "lora" if (run_dir / "lora").is_dir() else run_dir / "unet"
        shutil.copytree(exported, keep)
        candidates.append({"step": stop, "weights": str(keep)})
    return candidates


def _evaluate(
    cfg: SubjectRunConfig, root: Path, base: str, subjects: list[str], sets: list[Path], eval_dir: Path
):
    """The DreamBench protocol on the base and on every model set (same prompts and seeds), and each set's
    ``eval.json`` (win rate over the base on the λ-Harmonic reward, every metric's mean and CI)."""
    from ..eval.dreambench import DreamBenchConfig, compare_to_base, run_dreambench

    def bench(name: str, models: Path | None) -> dict:
        return run_dreambench(
            DreamBenchConfig(
                data=str(root),
                subjects=subjects,
                base=str(base),
                subject_models=str(models) if models else None,
                unique_token=cfg.unique_token,
                images_per_prompt=cfg.eval_images_per_prompt,
                clip=cfg.clip,
                dino=cfg.dino,
                steps=cfg.steps,
                guidance=cfg.guidance,
                output_dir=str(eval_dir / name),
            )
        )

    base_results = bench("base", None)
    out = {}
    for s in sets:
        result = compare_to_base(bench(s.name, s), base_results)
        (s / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        w = result["win_rate"]
        print(
            f"{s}: λ-Harmonic win rate over the base {w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
        )
        out[s.name] = {"win_rate": w, "eval_json": str(s / "eval.json")}
    return out


def _check_backbones(cfg: SubjectRunConfig, base: str) -> None:
    """The CLIP of labels and selection and, when the run ends with the DreamBench protocol, its DINO are on disk
    (a directory, or a catalog name whose weights are there): a missing one is named before the first subject
    trains, not after the last."""
    from ..eval.dreambench import backbone_names
    from ..preflight import check_reward, check_reward_weights

    clip, dino = backbone_names(base, cfg.clip, cfg.dino)
    names = {"subject_clip": clip, "subject_dino": dino} if cfg.eval else {"subject_clip": clip}
    for field_name, name in names.items():
        if not Path(name).expanduser().is_dir():
            check_reward(field_name, name)
            check_reward_weights(field_name, name)


def _train_argv(yaml_path: Path, train_argv: list[str], s_dir: Path) -> list[str]:
    """The training command line of one subject: its pairs, its run directory, no latent cache, no final evaluation
    (the driver selects and evaluates)."""
    return [
        "--config",
        str(yaml_path),
        *train_argv,
        "--dataset",
        str(s_dir / "pairs"),
        "--output_dir",
        str(s_dir / "run"),
        "--use_cache",
        "false",
        "--skip_eval",
        "true",
    ]


def _max_steps(argv: list[str]) -> int:
    from ..config import TrainConfig, parse_config

    return int(parse_config(TrainConfig, argv).max_train_steps)


def _select(
    subject, cfg: SubjectRunConfig, candidates: list[dict], validation: list[str], pipe, clip
) -> dict:
    """``{λ: the candidate with the highest mean λ-Harmonic reward on the validation prompts}`` (every candidate's
    scores are kept in it); without selection, the last candidate for λ = each of ``select_lambdas``."""
    from ..eval.benchmark_models import apply_variant, resolve_variant
    from ..eval.compare import expand_prompts, generate
    from ..eval.dreambench import load_images, mean_cosine_to_references, paired_cosine, remove_token
    from ..rewards.combine import lambda_harmonic

    if not cfg.select_every or len(candidates) == 1:
        return {lam: {**candidates[-1], "selected_by": "last"} for lam in cfg.select_lambdas}
    prompts = [t.format(cfg.unique_token, subject.class_word) for t in validation]
    rows_p, rows_s = expand_prompts(prompts, cfg.select_seeds)
    ref_emb = clip.images([im.convert("RGB") for im in load_images(subject.images)])
    texts = clip.texts([remove_token(p, cfg.unique_token) for p in rows_p])
    scored = []
    for c in candidates:
        with apply_variant(pipe, resolve_variant(c["weights"])) as p:
            images = generate(
                p, rows_p, rows_s, steps=cfg.steps, guidance=cfg.guidance, desc=f"select {c['step']}"
            )
        emb = clip.images(images)
        cos_i, cos_t = mean_cosine_to_references(emb, ref_emb), paired_cosine(emb, texts)
        scored.append(
            {
                **c,
                "clip_i": float(cos_i.mean()),
                "clip_t": float(cos_t.mean()),
                "harmonic": {
                    f"{lam:g}": float(lambda_harmonic(cos_i, cos_t, lam).mean()) for lam in cfg.select_lambdas
                },
            }
        )
    out = {}
    for lam in cfg.select_lambdas:
        best = max(scored, key=lambda s: s["harmonic"][f"{lam:g}"])
        out[lam] = {**best, "selected_by": f"lambda-harmonic {lam:g}", "scores": scored}
    return out


__all__ = ["SubjectRunConfig", "run_subjects", "split_argv"]

#!/usr/bin/env python
"""Evaluate a personalised preference tuning (PPD) run on the users it never saw: per-user win rates against the
starting model (and optionally a generic Diffusion-DPO run), user retrieval from the encoder, and an optional
interpolation between two users' embeddings.

    # the sandbox PPD run (default --run_dir outputs/ppd-sandbox, what configs/sandbox_ppd.yaml writes) on all 48
    # unseen users of sandbox-ppd
    python scripts/eval_ppd.py
    # ... and against a generic DPO LoRA
    python scripts/eval_ppd.py --run_dir outputs/ppd-sandbox --against outputs/dpo-sandbox

    # a quick look: 8 users, 2 seeds, and the curve from user 1000's tokens to user 1004's
    python scripts/eval_ppd.py --run_dir outputs/ppd-sandbox --num_users 8 --seeds 0 1 --interpolate 1000 1004

Every image is scored by the user it was made for (``overall + strength * taste``). Writes to --output_dir
(default ``<run_dir>/personal_eval``): ``eval.json`` (the common evaluation format plus per-user rows and every
per-image score), ``per_user.md``, ``samples.png``, ``retrieval.json``, ``interpolation.json`` and
``interpolation.png`` when asked (and ``interpolation_study.json``/``.png`` for ``--interpolate_pairs``), and
``summary.json``. Protocol and layout: ``diffalign/eval/personal.py``.
Flags may be written --num_users or --num-users.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from diffalign.cli import at_least  # noqa: E402

DEFAULT_RUN = REPO / "outputs" / "ppd-sandbox"  # configs/sandbox_ppd.yaml's output_dir


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)


def _ci(m: dict) -> str:
    return f"{m['mean']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _flag(p, "run_dir", default=None,
          help="the PPD run: lora/, user_attention.safetensors, user_encoder/ (default: outputs/ppd-sandbox)")  # fmt: skip
    _flag(p, "model", default="sandbox", help="the base pipeline ('sandbox' or a diffusers directory)")
    _flag(p, "data", default=None,
          help="a PPD build directory or name ('sandbox-ppd', 'sandbox-ppd-6u'; default: the run's dataset from its "
          "config.json when that is a PPD build, else 'sandbox-ppd')")  # fmt: skip
    _flag(p, "against", default=None, help="a generic run (its lora/) to compare the personalised model with")
    _flag(p, "k", type=at_least(1), default=4, help="context pairs per user for its embedding (default 4)")
    _flag(p, "context_split", default=None,
          help="split the unseen users' context pairs come from: 'context' or 'questionnaire' (default: the run's "
          "user_context_split from its config.json, else 'context')")  # fmt: skip
    _flag(p, "seeds", type=int, nargs="+", default=[0], help="sampling seeds per prompt (default 0)")
    _flag(p, "steps", type=at_least(1), default=20, help="sampling steps (default 20)")
    _flag(p, "guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    _flag(p, "user_scale", type=float, default=None,
          help="scale of the user attention branch (default: the run's user_scale from its config.json, else 1.0)")  # fmt: skip
    _flag(p, "num_users", type=at_least(1), default=None, help="the first N unseen users (default all)")
    _flag(
        p,
        "num_prompts",
        type=at_least(1),
        default=None,
        help="the first N test captions per user (default all)",
    )
    _flag(p, "batch_size", type=at_least(1), default=64, help="images per pipeline call (default 64)")
    _flag(p, "output_dir", default=None, help="default <run_dir>/personal_eval")
    _flag(p, "interpolate", type=int, nargs=2, default=None, metavar=("A", "B"), help="two unseen user ids")
    _flag(p, "interpolate_pairs", type=at_least(0), default=0, metavar="N",
          help="interpolation study over N pairs of unseen users who answered every question the other way "
          "(questionnaire runs; mean score changes: diffalign/eval/personal_interpolation.py); 0: off")  # fmt: skip
    _flag(p, "device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    _flag(p, "debug", action="store_true", help="full tracebacks instead of one-line errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.run_dir is None:
        if not (DEFAULT_RUN / "user_attention.safetensors").is_file():
            raise SystemExit(
                f"{DEFAULT_RUN}: no PPD run there (train it first: accelerate launch scripts/train_diffusion_dpo.py "
                "--config configs/sandbox_ppd.yaml, or give --run_dir)"
            )
        args.run_dir = str(DEFAULT_RUN)
    from diffalign.data.ppd import load_test_prompts
    from diffalign.eval import personal
    from diffalign.eval import personal_interpolation as pi
    from diffalign.eval.benchmark_pickapic import resolve_device

    out = Path(args.output_dir) if args.output_dir else Path(args.run_dir) / "personal_eval"
    device = resolve_device(args.device)
    data = personal.resolve_ppd_dir(args.data or personal.run_dataset(args.run_dir))
    unseen = personal.unseen_user_ids(data)
    user_ids = unseen[: args.num_users] if args.num_users else unseen
    pipe, encoder = personal.load_personalized(args.model, args.run_dir, device=device)
    against = personal.load_generic(args.model, args.against, device=device) if args.against else None
    gen = {"steps": args.steps, "guidance": args.guidance}
    split = args.context_split or personal.run_context_split(args.run_dir)
    if args.user_scale is None:
        args.user_scale = personal.run_user_scale(args.run_dir)

    result = personal.evaluate_personal(
        pipe, encoder, data, user_ids=user_ids, k=args.k, seeds=args.seeds, batch_size=args.batch_size,
        output_dir=out, against=against, user_scale=args.user_scale, num_prompts=args.num_prompts,
        context_split=split, **gen,
    )  # fmt: skip
    print(personal.format_personal(result))
    print(personal.per_user_markdown(result))

    retrieval = personal.user_retrieval(encoder, data, user_ids=user_ids, k=args.k, splits=(split, "context"))
    (out / "retrieval.json").write_text(json.dumps(retrieval, indent=2), encoding="utf-8")
    second = f"{args.k}..{2 * args.k - 1}" if split == "context" else f"context pairs 0..{args.k - 1}"
    print(
        f"user retrieval ({split} pairs 0..{args.k - 1} vs {second}, {retrieval['num_users']} users): "
        f"top-1 {retrieval['top1_accuracy']:.3f}, the other way {retrieval['top1_accuracy_reverse']:.3f} (chance "
        f"{retrieval['chance']:.3f}); cosine same user {retrieval['same_user_cosine']:.3f}, different users "
        f"{retrieval['different_user_cosine']:.3f}"
    )

    curve = None
    if args.interpolate:
        a, b = args.interpolate
        users = personal.population_users(data)
        prompts_of = load_test_prompts(data)
        if a not in unseen or b not in unseen:
            from diffalign.errors import ConfigError

            raise ConfigError(
                f"--interpolate {a} {b}: both must be unseen users of {data} (e.g. {unseen[:4]})"
            )
        prompts = list(dict.fromkeys(prompts_of[a] + prompts_of[b]))[: args.num_prompts]
        ta, tb = (personal.user_tokens(encoder, data, u, args.k, split=split) for u in (a, b))
        curve = pi.interpolation_curve(
            pipe, ta, tb, users[a], users[b], prompts, seeds=args.seeds, batch_size=args.batch_size,
            user_scale=args.user_scale, **gen,
        )  # fmt: skip
        (out / "interpolation.json").write_text(json.dumps(curve, indent=2), encoding="utf-8")
        pi.plot_interpolation(curve, out / "interpolation.png")
        pts = ", ".join(f"{p['alpha']:.2f}: {p['score_a']:.3f}/{p['score_b']:.3f}" for p in curve["points"])
        print(
            f"interpolation user {a} -> {b} (alpha: score of {a}/score of {b}): {pts}; "
            f"monotone {a}: {curve['monotone_a']}, {b}: {curve['monotone_b']}"
        )

    study = None
    if args.interpolate_pairs:
        pairs = pi.opposite_answer_pairs(data, user_ids, k=args.k, split=split)[: args.interpolate_pairs]
        study = pi.interpolation_study(
            pipe, encoder, data, pairs, k=args.k, split=split, seeds=args.seeds, batch_size=args.batch_size,
            user_scale=args.user_scale, **gen,
        )  # fmt: skip
        (out / "interpolation_study.json").write_text(json.dumps(study, indent=2), encoding="utf-8")
        pi.plot_study(study, out / "interpolation_study.png")
        fmt = (
            ", ".join(f"{x:+.4f}" for x in study["delta_a"]),
            ", ".join(f"{x:+.4f}" for x in study["delta_b"]),
        )
        print(
            f"interpolation study, {study['num_pairs']} pairs of users with opposite answers (alphas "
            f"{study['alphas']}): user a's score change {fmt[0]} (monotone {study['monotone_a']}; "
            f"{study['pairs_monotone_a']} pairs on their own), user b's {fmt[1]} (monotone {study['monotone_b']}; "
            f"{study['pairs_monotone_b']}); per-pair slope per unit alpha, mean [95% CI]: a "
            f"{_ci(study['slope_a'])}, b {_ci(study['slope_b'])}"
        )

    keys = ("win_rate", "mean_user_win_rate", "min_user_win_rate", "max_user_win_rate")
    summary = {
        "run_dir": str(args.run_dir),
        "against": args.against,
        "data": str(data),
        **{key: result[key] for key in keys},
        "vs_branch_off": {key: result["vs_branch_off"][key] for key in keys},
        "vs_against": {key: result["vs_against"][key] for key in keys} if against is not None else None,
        "retrieval": retrieval,
        "interpolation": curve,
        "interpolation_study": {k: v for k, v in study.items() if k != "curves"} if study else None,
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"written to {out}: eval.json, per_user.md, samples.png, retrieval.json, summary.json")
    return summary


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)

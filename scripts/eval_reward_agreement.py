#!/usr/bin/env python
"""How often catalog rewards rank the two images of a pair as the sandbox judge does (its noiseless overall score).

    python scripts/eval_reward_agreement.py outputs/onpolicy-pairs --split test \\
        --rewards sandbox-vp-onpolicy sandbox-vp-score sandbox-clip
    python scripts/eval_reward_agreement.py       # the shipped sandbox pairs' test split

Pairs whose images do not decode (or with no caption) are skipped and counted (stderr and ``skipped_pairs``).

Reads a Pick-a-Pic-schema split (``jpg_0``, ``jpg_1``, ``caption``), scores both images with the judge and with each
reward, and reports, over the pairs the judge decides (different overall scores), the share where the reward's
difference has the judge's sign (a reward tie counts 1/2), with a 95% Wilson interval. Prints a table, writes JSON.
This is the question an online method's training reward must answer well: which of two samples of one prompt is better.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "dataset",
        nargs="?",
        default="sandbox",
        help="Pick-a-Pic-schema directory, or 'sandbox' (the default: the shipped sandbox pairs)",
    )
    p.add_argument("--split", default="test")
    p.add_argument(
        "--rewards", nargs="+", default=["sandbox-vp-onpolicy", "sandbox-vp-score", "sandbox-clip"]
    )
    p.add_argument("--output", default="reward_agreement.json")
    args = p.parse_args(argv)

    import numpy as np
    from PIL import Image

    from diffalign.data.sources import resolve_dataset
    from diffalign.data.splits import load_pickapic_split
    from diffalign.rewards import load_reward
    from diffalign.sandbox.judge import Judge
    from diffalign.utils.stats import wilson_interval

    ds = load_pickapic_split(resolve_dataset(args.dataset), args.split)
    if len(ds) == 0:
        raise SystemExit(f"{args.dataset} split {args.split!r} has no rows: choose another split")

    def decode(b: bytes | None) -> np.ndarray | None:
        try:
            return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        except (
            OSError,
            TypeError,
            ValueError,
        ):  # missing or undecodable bytes: the pair is skipped and counted
            return None

    pairs = [(decode(x), decode(y), c) for x, y, c in zip(ds["jpg_0"], ds["jpg_1"], ds["caption"])]
    good = [(x, y, c) for x, y, c in pairs if x is not None and y is not None and c]
    skipped = len(pairs) - len(good)
    if skipped:
        print(f"{args.dataset} [{args.split}]: skipped {skipped} of {len(pairs)} pairs (an image that does not decode "
              "or no caption)", file=sys.stderr)  # fmt: skip
    if not good:
        raise SystemExit(
            f"{args.dataset} split {args.split!r} has no pair with two readable images and a caption"
        )
    a = np.stack([x for x, _, _ in good])
    b = np.stack([y for _, y, _ in good])
    prompts = [c for _, _, c in good]
    judge = Judge()
    dj = np.asarray(judge.score(a, prompts)["overall"]) - np.asarray(judge.score(b, prompts)["overall"])
    decided = dj != 0
    rows = {}
    for name in args.rewards:
        reward = load_reward(name)
        dr = (reward.score(a, prompts) - reward.score(b, prompts)).float().numpy()
        agree = np.where(dr[decided] == 0, 0.5, (np.sign(dr[decided]) == np.sign(dj[decided])).astype(float))
        n, k = int(decided.sum()), float(agree.sum())
        lo, hi = wilson_interval(k, n)
        rows[name] = {"agreement": k / n, "ci_low": lo, "ci_high": hi, "n": n}
    print(f"agreement with the judge's overall ranking on {int(decided.sum())} decided pairs of "
          f"{args.dataset} ({args.split}; {len(prompts)} pairs):")  # fmt: skip
    print("| reward | agreement | 95% CI |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['agreement']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
    out = {"dataset": args.dataset, "split": args.split, "pairs": len(prompts), "skipped_pairs": skipped,
           "rewards": rows}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    from diffalign.cli import main_for_people

    main_for_people(main)

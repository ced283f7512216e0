#!/usr/bin/env python
"""Subject-driven tuning over a DreamBench directory: one model per subject, DreamBooth or RPO, on the offline core.

    # RPO on the shipped sandbox subjects (checkpoint selection by λ = 0.3, 0.5, 0.7)
    python scripts/train_subjects.py --config configs/sandbox_rpo.yaml
    # the DreamBooth baseline, same data and budget
    python scripts/train_subjects.py --config configs/sandbox_dreambooth.yaml
    # then the DreamBench protocol on the models it wrote
    python scripts/benchmark_dreambench.py --data sandbox --subject_models outputs/rpo-subjects/lambda-0.5

The YAML is a training config (any field of scripts/train_diffusion_dpo.py) plus subject_* keys (the driver's:
--help lists them); flags override both. Models go to <subject_output_dir>/<subject>/ (or lambda-<λ>/<subject>/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.cli import main_for_people  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_rpo.yaml"


def main(argv: list[str] | None = None) -> dict:
    from dataclasses import MISSING, fields

    from diffalign.config import load_yaml
    from diffalign.training.subjects import SubjectRunConfig, run_subjects, split_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--debug"]
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print("subject settings (YAML key subject_<name>, flag --subject_<name>):")
        for f in fields(SubjectRunConfig):
            default = f.default_factory() if f.default is MISSING else f.default
            print(f"  --subject_{f.name:<22} {f.metadata.get('help', '')} (default {default!r})")
        print("every other flag is a training config field: python scripts/train_diffusion_dpo.py --help")
        return {}
    config = DEFAULT_CONFIG
    if "--config" in argv:
        i = argv.index("--config")
        config = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    cfg, train_yaml, rest = split_argv(load_yaml(config), argv)
    return run_subjects(cfg, train_yaml, rest)


if __name__ == "__main__":
    main_for_people(main)

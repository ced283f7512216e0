"""Atomic checkpoints on top of ``accelerator.save_state``: write to a temporary directory, then rename.

A checkpoint directory ``checkpoint-<step>`` appears only once everything in it is on disk, so a process killed
mid-write never leaves a half checkpoint that ``--resume_from_checkpoint latest`` would pick up. ``train_state.json``
holds the loop position (optimizer step, epoch, micro-batches consumed in the epoch) for an exact resume, and the
SHA-256 of every file in the checkpoint: a file damaged later (scrambled bytes that still parse, a truncated shard)
is named when the checkpoint is loaded instead of resuming into NaN losses. ``latest`` falls back to the newest
checkpoint that verifies and loads, and says which ones it skipped; a checkpoint that verifies but does not load
(written with other settings, such as another LoRA rank) stops the run instead, since starting over in the same
directory would overwrite it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..utils.digest import sha256_file as _sha256

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp`` directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_candidates(output_dir: str | Path, resume: str | None) -> list[Path]:
    """Checkpoints to try, in order: ``None`` -> none; ``"latest"`` -> every complete checkpoint, newest first (the
    caller falls back along the list); a path -> just that checkpoint (must exist)."""
    if not resume:
        return []
    if resume == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume!r}: {path} is not a complete diffalign checkpoint (no train_state.json)"
        )
    return [path]


def file_digests(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` except ``train_state.json``."""
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "train_state.json"
    }


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`~diffalign.errors.TrainingError` naming the first file whose bytes differ from when the
    checkpoint was written (or that is missing). Checkpoints written before digests existed pass unchecked."""
    from ..errors import TrainingError

    try:
        state = load_train_state(path)
    except (OSError, ValueError) as err:
        raise TrainingError(f"checkpoint {path}: train_state.json is unreadable ({err})") from err
    for rel, digest in state.get("files", {}).items():
        f = Path(path) / rel
        if not f.is_file():
            raise TrainingError(f"checkpoint {path}: file {f} is missing")
        if _sha256(f) != digest:
            raise TrainingError(
                f"checkpoint {path}: file {f} is corrupt (its SHA-256 differs from when it was saved)"
            )


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, train_state: dict, total_limit: int | None
) -> Path:
    """Save accelerator state + ``train_state.json`` atomically as ``<output_dir>/checkpoint-<step>``.

    Must be called on every process (accelerate gathers sharded states); only the main process renames and
    prunes. Keeps the newest ``total_limit`` checkpoints.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / "train_state.json", "w") as f:
            json.dump({**train_state, "files": file_digests(tmp)}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
        if total_limit:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


OFFLINE_POSITION_FIELDS = ("objective", "seed", "dataset", "split", "max_train_samples", "tie_policy", "train_batch_size",
                           "gradient_accumulation_steps", "resolution", "random_crop", "random_flip")  # fmt: skip
"""Offline settings that decide which pairs a step draws: a resume with other values is not a continuation."""
ONLINE_POSITION_FIELDS = ("objective", "seed", "prompts", "prompt_pool_size", "prompts_per_epoch", "images_per_prompt",
                          "train_batch_size", "gradient_accumulation_steps", "reward")  # fmt: skip
"""Online settings that decide an epoch's prompts, samples and updates."""


def run_settings(cfg, fields: tuple[str, ...], num_processes: int) -> dict:
    """The values of ``fields`` (and the process count) that a checkpoint records, to compare on resume."""
    return {**{f: getattr(cfg, f, None) for f in fields}, "num_processes": int(num_processes)}


def changed_settings(state: dict, current: dict) -> list[str]:
    """``["train_batch_size 4 -> 8", ...]``: the recorded settings that differ now (none for a checkpoint that
    recorded none, written before they were)."""
    saved = state.get("settings") or {}
    return [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]


def warn_changed_settings(accelerator, state: dict, current: dict) -> list[str]:
    """Print one line when the run resumes with settings other than the checkpoint's: the loop position it restores
    (epoch, batches, prompt stream) was counted under the old ones, so the run is not an exact continuation."""
    changes = changed_settings(state, current)
    if changes:
        accelerator.print(
            f"warning: resuming {state.get('path', 'a checkpoint')} with settings that differ from the ones it was "
            f"written with ({'; '.join(changes)}): the data position it restores was counted under the old ones, "
            "so this run is not an exact continuation"
        )
    return changes


def load_train_state(path: Path) -> dict:
    return json.loads((Path(path) / "train_state.json").read_text())


def resume_state(accelerator, unet, output_dir: str | Path, resume: str | None) -> dict | None:
    """Load the checkpoint ``resume`` names into the accelerator's objects and return its ``train_state``, or
    ``None`` to start fresh. ``latest`` falls back to the newest checkpoint that verifies and loads, naming each one
    it skipped (damaged ones); an explicit directory that does not load, or an intact one (its files match their
    digests) that does not fit this run's model or optimizer, raises :class:`~diffalign.errors.TrainingError`."""
    import torch

    from ..errors import TrainingError

    candidates = resume_candidates(output_dir, resume)
    if resume == "latest" and not candidates:
        accelerator.print(f"resume_from_checkpoint=latest: no checkpoint in {output_dir}; starting fresh")
        return None
    for path in candidates:
        intact = False  # its files match the digests written with it: a load failure is then not damage
        try:
            verify_checkpoint(path)
            st = load_train_state(path)
            intact = bool(st.get("files"))
            accelerator.load_state(str(path))
            bad = next((n for n, p in unet.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:  # e.g. a checkpoint written before file digests existed, damaged since
                raise TrainingError(f"checkpoint {path}: weight {bad} holds NaN/inf values")
        except Exception as err:  # noqa: BLE001 - any failure to load means: this checkpoint is unusable
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if resume != "latest":
                raise TrainingError(f"cannot resume from {path}: {reason}") from err
            if intact and not isinstance(err, TrainingError):
                # Written by a run with other settings (LoRA rank or targets, model, optimizer): falling back or
                # starting fresh would overwrite it with this run's checkpoints of the same names.
                raise TrainingError(
                    f"checkpoint {path} is intact but does not load into this run ({reason}): it was written "
                    "with other settings. Resume with the settings it was written with, or give a new output_dir"
                ) from err
            accelerator.print(f"skipping checkpoint {path}: {reason}")
            continue
        st["path"] = str(path)
        return st
    if candidates:
        accelerator.print(
            f"resume_from_checkpoint=latest: no loadable checkpoint in {output_dir}; starting fresh"
        )
    return None

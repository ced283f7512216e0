"""The reference-error cache: the frozen reference's per-image errors, stored once and reused by later runs.

In the offline-pairs step every random choice that decides a pair's loss — timestep, noise, prompt dropout, the
flip and crop — is drawn from a generator keyed by ``(seed, epoch, dataset index)``, and the reference network never
changes. When the noised input does not depend on the trained model either (Gaussian noising; DDIM inversion with
``inversion_model: reference``), the reference's error ``err_ref`` of an image is a deterministic function of
(reference weights, data, seed, epoch, index, noising, error space). Diffusion-DPO spends a quarter of its UNet work
on it (one no-grad forward next to the policy's forward and backward). This cache keeps those numbers:

* **filled lazily, for free**: a run computes ``err_ref`` as usual and records it (a few floats per pair); nothing
  is computed ahead, so a first or short run costs nothing extra;
* **reused**: a later run with the same key reads the errors of the pairs it meets and skips the reference forward
  for every micro-batch whose pairs are all there. β, learning-rate, loss-type, label-smoothing, batch-size and
  step-count sweeps share the key; so do resumed runs;
* **exact**: the stored values are the float32 errors the first run computed, so a reusing run with the same batch
  composition (same seed and batch size) trains bit-identically (``tests/test_reference_cache.py``). With another
  batch size the stored values differ from a fresh computation only by the kernels' batch-size-dependent
  summation order (~1e-7 relative on CPU).

Layout (``<cache_root>/reference-errors-<digest16>/``)::

    key.json                              the key below and its sha256
    part-r<rank>-<time_ns>.safetensors    epoch [n] int64, index [n] int64, err [n, k] float32 (k = 2: winner,
                                          loser; 1 for winners-only objectives), written atomically at each
                                          checkpoint and at the end of training, one file per process and flush

**Key.** The reference (its UNet directory's files by name/size/mtime, its architecture, dtype), the device type
and attention backend, the data (the latent cache's digest, or the dataset fingerprint with the encoders, the
resolution, crop and flip when encoding on the fly), the seed, the prompt dropout, the noise schedule and
prediction type, and the objective's timestep distribution, noising and error space with the hyperparameters those
read (:func:`diffalign.diffusion.parts.reference_error_inputs`). Objectives whose noised input depends on the
trained model (InPO's official ``inversion_model: current``) are not cached: there is nothing deterministic to
keep. Switch the cache off with ``reference_cache: false``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

KEY_VERSION = 1


class ReferenceErrorCache:
    """Stored reference errors of ``(epoch, index)`` pairs; ``lookup`` / ``add`` / ``flush``."""

    def __init__(self, directory: str | Path, key: dict[str, Any], rank: int = 0, k: int = 2):
        from safetensors.torch import load_file

        self.directory = Path(directory)
        self.key, self.rank, self.k = key, rank, k
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if not key_file.exists() and rank == 0:
            _atomic_write_bytes(
                key_file, json.dumps({"key": key, "sha256": key_digest(key)}, indent=2).encode()
            )
        # stored: epoch -> (sorted index [n], err [n, k]); loaded once, read-only during the run
        by_epoch: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.files_read = 0
        for part in sorted(self.directory.glob("part-*.safetensors")):
            try:
                t = load_file(str(part))
            except Exception:  # a torn or foreign file: ignore it (writes are atomic, so this is not ours)
                continue
            if t["err"].shape[1:] != (k,):
                continue
            self.files_read += 1
            for e in t["epoch"].unique().tolist():
                sel = t["epoch"] == e
                idx, err = by_epoch.setdefault(int(e), ([], []))
                idx.append(t["index"][sel])
                err.append(t["err"][sel])
        self._stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, (idx, err) in by_epoch.items():
            i, e_ = torch.cat(idx), torch.cat(err)
            order = torch.argsort(i, stable=True)
            self._stored[e] = (i[order], e_[order])
        self.stored_entries = sum(len(i) for i, _ in self._stored.values())
        self._new: dict[tuple[int, int], torch.Tensor] = {}
        self._unflushed: list[tuple[int, int]] = []
        self.hits = 0  # pairs whose reference error came from the cache
        self.misses = 0  # pairs whose reference error was computed

    def _find(self, epoch: int, index: int) -> torch.Tensor | None:
        got = self._new.get((epoch, index))
        if got is not None:
            return got
        stored = self._stored.get(epoch)
        if stored is None:
            return None
        idx, err = stored
        pos = int(torch.searchsorted(idx, index))
        if pos < len(idx) and int(idx[pos]) == index:
            return err[pos]
        return None

    def lookup(self, epoch: int, indices: torch.Tensor) -> torch.Tensor | None:
        """The stacked errors ``[k·B]`` (winners then losers, the step's layout) when every pair of the batch is
        stored; ``None`` otherwise (the step then computes the whole batch, as without a cache)."""
        rows = []
        for i in indices.tolist():
            got = self._find(epoch, int(i))
            if got is None:
                self.misses += len(indices)
                return None
            rows.append(got)
        self.hits += len(indices)
        return torch.stack(rows).t().reshape(-1)  # [B, k] -> [k, B] -> [k·B]

    def add(self, epoch: int, indices: torch.Tensor, err: torch.Tensor) -> None:
        """Record the stacked errors ``[k·B]`` the step just computed for ``indices`` [B]."""
        per_pair = err.detach().float().cpu().reshape(self.k, -1).t()  # [B, k]
        for i, row in zip(indices.tolist(), per_pair):
            key = (epoch, int(i))
            if key not in self._new and self._find(epoch, int(i)) is None:
                self._new[key] = row.clone()
                self._unflushed.append(key)

    def flush(self) -> Path | None:
        """Write the errors recorded since the last flush to a new part file (atomically); ``None`` if none."""
        if not self._unflushed:
            return None
        from safetensors.torch import save_file

        keys, self._unflushed = self._unflushed, []
        tensors = {
            "epoch": torch.tensor([e for e, _ in keys], dtype=torch.long),
            "index": torch.tensor([i for _, i in keys], dtype=torch.long),
            "err": torch.stack([self._new[k] for k in keys]).contiguous(),
        }
        path = self.directory / f"part-r{self.rank}-{time.time_ns()}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return path

    def describe(self) -> str:
        total = self.hits + self.misses
        share = f"{self.hits / total:.0%}" if total else "n/a"
        return (
            f"reference errors: {self.hits:,} of {total:,} pairs read from the cache ({share}; "
            f"{self.stored_entries:,} stored before this run, {len(self._new):,} added) in {self.directory}"
        )


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def open_cache(root: str | Path, key: dict[str, Any], rank: int = 0, k: int = 2) -> ReferenceErrorCache:
    return ReferenceErrorCache(Path(root) / f"reference-errors-{key_digest(key)[:16]}", key, rank, k)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()


def build_for_run(cfg, run, data, spec, step) -> ReferenceErrorCache | None:
    """The cache for an offline-pairs run, or ``None`` when it does not apply: switched off, no reference, a
    noising that depends on the trained model, slot-1 images the trained model draws (PSO), or streamed data (rows
    are positions in a stream)."""
    from ..data.cache import model_fingerprint
    from ..diffusion.parts import reference_error_inputs
    from .cached import default_cache_root, encoder_id

    if not getattr(cfg, "reference_cache", False) or not spec.needs_reference or cfg.streaming:
        return None
    if spec.loser_source != "data":  # the reference's errors on the model's own samples change with the model
        return None
    step_inputs = reference_error_inputs(spec, cfg.params)
    if step_inputs is None:
        return None
    comps, acc = run.comps, run.accelerator
    unet_dir = Path(comps.model_path) / "unet"
    if data.cached:
        data_key: dict[str, Any] = {"latent_cache": Path(data.info["cache"]).name}
    else:
        data_key = {
            "pairs": data.pairs.fingerprint(),
            "encoders": encoder_id(comps),
            "resolution": cfg.resolution,
            "crop": "random" if cfg.random_crop else "center",
            "random_flip": cfg.random_flip,
        }
    key = {
        "version": KEY_VERSION,
        "reference": {
            # the starting weights' files (name, size, mtime) and architecture; not the adapters (disabled)
            "unet": model_fingerprint(
                unet_dir if unet_dir.exists() else f"{comps.model_path}@{cfg.revision}@{cfg.variant}",
                json.dumps(dict(run.unwrapped_unet().config), sort_keys=True, default=str),
            ),
            "finetune": cfg.finetune,
            "dtype": str(cfg.reference_dtype if cfg.finetune == "full" else run.weight_dtype),
            "mixed_precision": acc.mixed_precision,
            "device": acc.device.type,
            "attention": run.attention,
        },
        "data": data_key,
        "seed": cfg.seed,
        "prompt_dropout": cfg.prompt_dropout,
        "schedule": {
            "alphas_cumprod": tensor_digest(step.alphas_cumprod),
            "prediction_type": comps.prediction_type,
            "steps_offset": step.steps_offset,
            "initial_alpha_cumprod": step.initial_alpha_cumprod,
        },
        "step": step_inputs,
    }  # fmt: skip
    return open_cache(default_cache_root(cfg), key, rank=acc.process_index, k=2 if spec.uses_losers else 1)

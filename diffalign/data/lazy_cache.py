"""A latent cache filled as training goes (``cache_mode: lazy``, the default): never slower than encoding on the fly.

The up-front cache (:mod:`diffalign.data.cache`, ``cache_mode: upfront``) encodes the whole split before the first
step, both orientations of every image: a short run pays for pairs it never reads (on the sandbox split, 17 s before
a 50-step run that reads half of it). Here nothing is encoded ahead:

* the dataset returns a pair's stored latents and text embeddings when this orientation of it was encoded by an
  earlier run (or earlier in this one), and its pixels otherwise;
* the step encodes the pixel rows of a batch — exactly the work of the on-the-fly path —, rounds the results to
  the storage dtype and trains on the rounded values, and records them; so the run that fills the cache and every
  run that reads it train on the same numbers (bit-identical losses, ``tests/test_lazy_cache.py``);
* records are appended to chunk files (every ``flush_every`` new pairs, at each checkpoint and at the end): an
  interrupted run keeps what it flushed, a resumed or later run continues from there. Only the orientation a run
  actually drew is encoded (no flipped copies when ``random_flip`` is off).

Layout (``<cache_root>/latents-<digest16>/``)::

    key.json                            the key (as the up-front cache's: encoders, resolution, centre crop, storage
                                        dtype, data fingerprint) and its sha256
    chunk-r<rank>-<time_ns>.safetensors one flush of one process:
        row_indices [n] int64 · flipped [n] bool · latents [n, 2, C, h, w] (storage dtype)
        caption_ids [n] int64 (into the ``captions`` metadata list) · original_sizes, crop_top_lefts [n, 2, 2]
        ranking_ids, user_ids [n] int64 · pref_probs [n] float32 · is_tie [n] bool
        text.<name> [m, ...] (storage dtype) for the ``text_captions`` metadata list: captions first seen here

Random crops are not cached (the crop would be part of the key of every row); use ``use_cache: false`` for them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .pair_images import example_rng
from .pickapic import PickAPicPairs, stack_pair_metadata
from .sampler import split_index

LAYOUT = "lazy-chunks-v1"

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeText = Callable[[Sequence[str]], dict[str, torch.Tensor]]


class LatentStore:
    """``(source row, flipped) -> encoded pair`` and ``caption -> text embeddings``, on disk and in memory."""

    def __init__(
        self, directory: str | Path, key: dict[str, Any], *, rank: int = 0,
        storage_dtype: torch.dtype = torch.float16, flush_every: int = 1024,
    ) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.key, self.rank, self.storage_dtype, self.flush_every = key, rank, storage_dtype, flush_every
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if not key_file.exists():
            tmp = key_file.with_name(f"key.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key}, indent=1, sort_keys=True))
            tmp.replace(key_file)
        self._chunks: list[Path] = []
        self._rows: dict[tuple[int, bool], tuple[int, int]] = {}
        self._text: dict[str, tuple[int, int]] = {}
        self._chunk_captions: list[list[str]] = []
        self.unreadable = 0
        for path in sorted(self.directory.glob("chunk-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata()
                    rows, flipped = f.get_tensor("row_indices").tolist(), f.get_tensor("flipped").tolist()
                    captions, text_captions = json.loads(meta["captions"]), json.loads(meta["text_captions"])
            except Exception:  # writes are atomic: an unreadable file is not one of ours; leave it alone
                self.unreadable += 1
                continue
            self._register(path, rows, flipped, captions, text_captions)
        self.stored_pairs = len(self._rows)
        self._handles: dict[int, Any] = {}
        self._pending: dict[tuple[int, bool], dict[str, Any]] = {}
        self._pending_text: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0  # examples read from the store
        self.encoded = 0  # examples encoded (and recorded) in this process

    def _register(self, path, rows, flipped, captions, text_captions) -> None:
        c = len(self._chunks)
        self._chunks.append(path)
        self._chunk_captions.append(captions)
        for i, (r, fl) in enumerate(zip(rows, flipped)):
            self._rows.setdefault((int(r), bool(fl)), (c, i))
        for j, cap in enumerate(text_captions):
            self._text.setdefault(cap, (c, j))

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: own file handles, no pending copies
        state = self.__dict__.copy()
        state["_handles"], state["_pending"], state["_pending_text"] = {}, {}, {}
        return state

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending)

    def _file(self, c: int):
        if c not in self._handles:
            self._handles[c] = safe_open(str(self._chunks[c]), framework="pt")
        return self._handles[c]

    def text(self, caption: str) -> dict[str, torch.Tensor] | None:
        """The stored text embeddings of ``caption`` (float32, no batch dim), or ``None``."""
        if caption in self._pending_text:
            return {k: v.float() for k, v in self._pending_text[caption].items()}
        where = self._text.get(caption)
        if where is None:
            return None
        c, j = where
        f = self._file(c)
        return {k[5:]: f.get_slice(k)[j : j + 1][0].float() for k in f.keys() if k.startswith("text.")}

    def get(self, row: int, flipped: bool) -> dict[str, Any] | None:
        """The stored example of source ``row`` in this orientation, or ``None`` (not encoded yet)."""
        key = (int(row), bool(flipped))
        pending = self._pending.get(key)
        if pending is not None:
            ex = {k: v for k, v in pending.items()}
            ex["latents"] = pending["latents"].float()
        else:
            where = self._rows.get(key)
            if where is None:
                return None
            c, i = where
            f = self._file(c)

            def one(name: str) -> torch.Tensor:
                return f.get_slice(name)[i : i + 1][0]

            ex = {
                "latents": one("latents").float(),
                "caption": self._chunk_captions[c][int(one("caption_ids"))],
                "original_sizes": one("original_sizes"),
                "crop_top_lefts": one("crop_top_lefts"),
                "ranking_id": int(one("ranking_ids")),
                "user_id": int(one("user_ids")),
                "pref_prob": float(one("pref_probs")),
                "is_tie": bool(one("is_tie")),
            }
        text = self.text(ex["caption"])
        if text is None:  # a torn write cannot do this (text lands with its first row); be safe anyway
            return None
        return {**ex, "text": text, "row_index": key[0], "flipped": key[1]}

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """What the store will give back for ``x``: rounded to the storage dtype, as float32."""
        return x.detach().to("cpu", self.storage_dtype).float()

    def put(self, ex: dict[str, Any], latents: torch.Tensor, text: dict[str, torch.Tensor]) -> None:
        """Record one encoded example (``latents`` [2, C, h, w], ``text`` {name: tensor} without batch dim)."""
        key = (int(ex["row_index"]), bool(ex["flipped"]))
        if key in self._pending or key in self._rows:
            return
        if ex["caption"] not in self._text and ex["caption"] not in self._pending_text:
            self._pending_text[ex["caption"]] = {
                k: v.detach().to("cpu", self.storage_dtype) for k, v in text.items()
            }
        self._pending[key] = {
            "latents": latents.detach().to("cpu", self.storage_dtype),
            "caption": ex["caption"],
            "original_sizes": ex["original_sizes"].clone(),
            "crop_top_lefts": ex["crop_top_lefts"].clone(),
            "ranking_id": int(ex["ranking_id"]),
            "user_id": int(ex["user_id"]),
            "pref_prob": float(ex["pref_prob"]),
            "is_tie": bool(ex["is_tie"]),
        }
        self.encoded += 1
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> Path | None:
        """Append the records of this process since the last flush as one chunk file (atomically)."""
        if not self._pending:
            return None
        keys = list(self._pending)
        recs = [self._pending[k] for k in keys]
        captions = sorted({r["caption"] for r in recs})
        cap_id = {c: i for i, c in enumerate(captions)}
        text_captions = sorted(self._pending_text)
        tensors = {
            "row_indices": torch.tensor([k[0] for k in keys], dtype=torch.long),
            "flipped": torch.tensor([k[1] for k in keys], dtype=torch.bool),
            "latents": torch.stack([r["latents"] for r in recs]).contiguous(),
            "caption_ids": torch.tensor([cap_id[r["caption"]] for r in recs], dtype=torch.long),
            "original_sizes": torch.stack([r["original_sizes"] for r in recs]).contiguous(),
            "crop_top_lefts": torch.stack([r["crop_top_lefts"] for r in recs]).contiguous(),
            "ranking_ids": torch.tensor([r["ranking_id"] for r in recs], dtype=torch.long),
            "user_ids": torch.tensor([r["user_id"] for r in recs], dtype=torch.long),
            "pref_probs": torch.tensor([r["pref_prob"] for r in recs], dtype=torch.float32),
            "is_tie": torch.tensor([r["is_tie"] for r in recs], dtype=torch.bool),
        }
        for name in self._pending_text[text_captions[0]] if text_captions else ():
            tensors[f"text.{name}"] = torch.stack(
                [self._pending_text[c][name] for c in text_captions]
            ).contiguous()
        path = self.directory / f"chunk-r{self.rank}-{time.time_ns()}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        meta = {"captions": json.dumps(captions), "text_captions": json.dumps(text_captions)}
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        self._register(path, [k[0] for k in keys], [k[1] for k in keys], captions, text_captions)
        self._pending, self._pending_text = {}, {}
        return path

    def complete(
        self, batch: dict[str, Any], encode_images: EncodeImages, encode_text: EncodeText
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents ``[B, 2, C, h, w]`` and text ``{name: [B, ...]}`` (float32, CPU) of a :func:`collate_lazy`
        batch: stored rows as read; the rows still to encode are looked up once more (another worker may not have
        seen this process's newest records), then encoded, rounded to the storage dtype and recorded."""
        examples: list[dict[str, Any]] = batch["examples"]
        lat: list[torch.Tensor | None] = [ex.get("latents") for ex in examples]
        txt: list[dict | None] = [ex.get("text") for ex in examples]
        todo = []
        for i, ex in enumerate(examples):
            if lat[i] is not None:
                continue
            got = self.get(ex["row_index"], ex["flipped"])
            if got is not None:
                lat[i], txt[i] = got["latents"], got["text"]
            else:
                todo.append(i)
        self.hits += len(examples) - len(todo)
        if todo:
            pix = torch.stack([examples[i]["pixel_values"] for i in todo])  # [M, 2, 3, H, W]
            with torch.no_grad():
                z = encode_images(pix.flatten(0, 1)).unflatten(0, (len(todo), 2))
                need = sorted(
                    {examples[i]["caption"] for i in todo if self.text(examples[i]["caption"]) is None}
                )
                fresh = encode_text(need) if need else {}
            new_text = {c: {k: self.round(v[j]) for k, v in fresh.items()} for j, c in enumerate(need)}
            for j, i in enumerate(todo):
                ex = examples[i]
                lat[i] = self.round(z[j])
                txt[i] = new_text.get(ex["caption"]) or self.text(ex["caption"])
                self.put(ex, lat[i], txt[i])
        latents = torch.stack(lat)  # type: ignore[arg-type]
        text = {k: torch.stack([t[k] for t in txt]) for k in txt[0]}  # type: ignore[index,union-attr]
        return latents, text

    def describe(self) -> str:
        total = self.hits + self.encoded
        share = f"{self.hits / total:.0%}" if total else "n/a"
        return (
            f"latent cache (lazy): {self.hits:,} of {total:,} examples read, {self.encoded:,} encoded and recorded "
            f"({share} read; {self.stored_pairs:,} stored before this run) in {self.directory}"
        )


class LazyCachedPairs(Dataset):
    """``pairs`` through a :class:`LatentStore`: the stored example when this orientation of the pair's row was
    encoded, the on-the-fly example (pixels) otherwise. Indexing and augmentation as :class:`PickAPicPairs`
    (``dataset[epoch * N + position]``, flip drawn from ``example_rng(seed, epoch, position)``)."""

    def __init__(self, pairs: PickAPicPairs, store: LatentStore, *, random_flip: bool, seed: int) -> None:
        self.pairs, self.store, self.random_flip, self.seed = pairs, store, random_flip, seed
        self.stats = pairs.stats

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = split_index(index, len(self.pairs))
        # the flip bit of PairTransform's draw order (crop offsets, then the flip); centre crop only
        flip = bool(self.random_flip and example_rng(self.seed, epoch, position).random(3)[2] < 0.5)
        got = self.store.get(int(self.pairs.rows[position]), flip)
        if got is not None:
            return {**got, "position": position, "skipped": {}}
        return self.pairs[index]


def collate_lazy(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The batch of a lazily cached loader: metadata stacked as usual, ``examples`` kept for
    :meth:`LatentStore.complete` (which makes ``latents`` and ``text``), ``index`` = source rows."""
    meta = stack_pair_metadata(examples)
    return {"examples": list(examples), **meta, "index": meta["row_indices"]}


__all__ = ["LAYOUT", "LatentStore", "LazyCachedPairs", "collate_lazy"]

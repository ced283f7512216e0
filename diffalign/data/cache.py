"""Out-of-core caches of VAE latents and text embeddings for preference pairs.

The public Diffusion-DPO script re-encoded every image with the VAE at every step. Here the pairs of a
:class:`~diffalign.data.pickapic.PickAPicPairs` dataset are encoded **once** into shards on disk and read back per
item through memory-mapped safetensors slices: a million pairs never need to fit in RAM.

Layout of one cache (``<cache_root>/pairs-<digest16>/``)::

    key.json                      the full cache key (below) and its sha256 digest
    shard-00000.safetensors       pairs of positions [0, S) of the filtered dataset that encoded cleanly
    shard-00000.json              that shard's pair count, unique captions, skip counts (written last = complete)
    ...
    manifest.json                 shard list, totals, latent/text shapes; written when every shard is complete

Tensors of a shard with ``n`` pairs and ``m`` unique captions (first image = winner)::

    latents                 [n, 2, C, h, w]  centre crop, as returned by encode_images (already VAE-scaled)
    latents_flipped         [n, 2, C, h, w]  the same crops flipped left-right in *pixel* space before encoding
    caption_ids             [n]              index into the shard's unique captions
    text.<name>             [m, ...]         every tensor returned by encode_text, once per unique caption
    original_sizes          [n, 2, 2]        (h, w) of each decoded image
    crop_top_lefts          [n, 2, 2]        (top, left) of the centre crop
    crop_top_lefts_flipped  [n, 2, 2]        (top, W - left - R): the crop seen in the flipped image
    ranking_ids, user_ids, row_indices, positions [n] int64 · is_tie [n] bool
    pref_probs              [n] float32      P(first image preferred): 1.0, 0.5 for a kept tie (batches: label_w)

**Random crop and flip vs caching.** A cache fixes the preprocessing: the crop is always the centre crop. The
horizontal flip survives: both orientations are stored and :class:`CachedPairs` picks one per example from
``default_rng([seed, epoch, position])`` (the same draw order as :class:`~diffalign.data.pickapic.PairTransform`),
the **same** orientation for the winner and the loser. (Flipping latents instead of pixels would not be exact: the
VAE is not flip-equivariant.) Random crops are not cached; use the uncached dataset for them.

**Storage dtype** (``storage_dtype``; the training config's ``cache_dtype``). ``float32`` stores what the encoders
returned, bit for bit. ``float16`` (the default: half the disk) rounds every value to the nearest float16: a
relative error of at most 2^-11 = 4.9e-4 per element, an absolute one of at most 2^-8 = 3.9e-3 for latents whose
|values| are below 16. Measured on the sandbox (its VAE and text encoder, all 3,185 train pairs left after
dropping ties, 32 px, 2 epochs: each cached batch against the on-the-fly encoding of the same pairs and flips, as
training computes it; relative errors over elements with |value| > 0.01)::

    cache dtype   latents: max abs error   max rel error   text embeddings: max abs error   max rel error
    float16       3.9e-3 (|values| <= 9.6)  4.9e-4          9.8e-4                           4.9e-4
    float32       7.2e-7                    3.9e-5          0                                0

measured by ``SANDBOX_CACHE_PAIRS=3185 pytest -s tests/test_training_data.py -k float16_cache_error_on_the_sandbox``
(without the variable the test runs the first 256 pairs: float16 3.1e-3 / 4.9e-4, float32 0). Reads are returned
as float32. The float32 differences are not the cache's: the VAE's CPU kernels give slightly different results
for the same image in batches of different sizes (the cache encodes 4 images per pair, training 2 per pair); with
one image per encoder call the float32 cache equals on-the-fly encoding bit for bit
(``test_float32_cache_equals_on_the_fly_encoding_exactly``).

**Cache key.** ``digest = sha256(json(key))`` with ``key`` = model identity (``model_id``: a string you choose, or
:func:`model_fingerprint` of the VAE/text encoders), resolution, crop mode, storage dtype, the preprocessing
version of this module, and the data fingerprint (source, split, dataset fingerprint, tie policy,
``verify_images``, sha256 of the filtered row list and of each pair's winner, -1 for a kept tie, so the stored
``pref_probs`` always match the key). Changing any of these gives another directory, so a stale
cache is never read; the old one stays until you delete it. A directory whose build was interrupted is
completed shard by shard on the next call. With several processes, build on the main process first::

    with accelerator.main_process_first():
        train_set = build_latent_cache(pairs, encode_images, encode_text, cache_root=..., model_id=...)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .pickapic import PairSkip, PairStats, PairTransform, PickAPicPairs, example_rng, stack_pair_metadata
from .sampler import split_index

PREPROCESS_VERSION = 1
"""Bump when the pixel preprocessing or the shard format changes: every existing cache key changes with it."""

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
"""``pixel_values [N, 3, H, W] in [-1, 1] -> latents [N, C, h, w]`` (already multiplied by the VAE scaling factor)."""
EncodeText = Callable[[list[str]], Mapping[str, torch.Tensor]]
"""``captions (N) -> {"prompt_embeds": [N, L, D], ...}`` (SDXL adds ``"pooled_prompt_embeds": [N, D2]``)."""

_PAIR_TENSORS = ("latents", "latents_flipped", "caption_ids", "original_sizes", "crop_top_lefts")


# ----------------------------------------------------------------------------------------------------------------
# Keys


def model_fingerprint(*components: Any, hash_weights: bool = False) -> str:
    """A sha256 hex digest identifying encoders, for ``model_id``.

    Each component may be a string (used verbatim, e.g. ``"stabilityai/sdxl-vae@rev"``), a path (file: name,
    size, mtime; directory: the same for every file below it), or a ``torch.nn.Module`` (class, ``config`` if it
    has one — diffusers/transformers models do —, parameter names, shapes and dtypes; with ``hash_weights=True``
    also the parameter bytes, which costs one pass over the weights).
    """
    h = hashlib.sha256()
    for comp in components:
        if isinstance(comp, torch.nn.Module):
            h.update(type(comp).__qualname__.encode())
            config = getattr(comp, "config", None)
            if config is not None:
                as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
                h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
            for name, tensor in comp.state_dict().items():
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                if hash_weights:
                    h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(comp, (str, os.PathLike)) and Path(comp).exists():
            path = Path(comp)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                st = f.stat()
                h.update(
                    f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode()
                )
        elif isinstance(comp, str):
            h.update(comp.encode())
        else:
            raise TypeError(
                f"model_fingerprint: cannot fingerprint a {type(comp).__name__}; pass a str, path or Module"
            )
        h.update(b"\0")
    return h.hexdigest()


def cache_key(pairs: PickAPicPairs, model_id: str, storage_dtype: torch.dtype) -> dict[str, Any]:
    """The full key of a cache of ``pairs`` (see the module docstring)."""
    if not model_id:
        raise ValueError(
            "model_id must identify the encoders (a name, or model_fingerprint(vae, text_encoder))"
        )
    return {
        "model_id": model_id,
        "resolution": pairs.transform.resolution,
        "crop": "center",
        "flips": "both",
        "storage_dtype": str(storage_dtype).replace("torch.", ""),
        "preprocess_version": PREPROCESS_VERSION,
        "data": pairs.fingerprint(),
    }


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Building


class _CenterPairs(Dataset):
    """Centre-crop, unflipped examples of ``pairs`` by position; bad rows become ``{"skip_reason": ...}``."""

    def __init__(self, pairs: PickAPicPairs) -> None:
        self.pairs = pairs
        self.transform = PairTransform(pairs.transform.resolution, "center", random_flip=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, position: int) -> dict[str, Any]:
        try:
            return self.pairs.load_pair(position, 0, transform=self.transform, flip=False)
        except PairSkip as skip:
            return {"skip_reason": skip.reason, "position": position}


def _flipped_crops(
    transform: PairTransform, original_sizes: torch.Tensor, crops: torch.Tensor
) -> torch.Tensor:
    """``(top, left)`` -> ``(top, W - left - R)`` with ``W`` the resized width of each image. [n, 2, 2] long."""
    out = crops.clone()
    r = transform.resolution
    for i in range(crops.shape[0]):
        for j in range(2):
            _, new_w = transform.resized_size(int(original_sizes[i, j, 0]), int(original_sizes[i, j, 1]))
            out[i, j, 1] = new_w - int(crops[i, j, 1]) - r
    return out


def _encode_shard(
    loader: DataLoader,
    transform: PairTransform,
    encode_images: EncodeImages,
    encode_text: EncodeText,
    storage_dtype: torch.dtype,
    bar: tqdm,
) -> tuple[dict[str, torch.Tensor], list[str], Counter]:
    """Encode one shard's positions. Returns (tensors, unique captions, skip counts)."""
    skipped: Counter = Counter()
    lat, lat_f, cap_ids, sizes, crops, meta = (
        [],
        [],
        [],
        [],
        [],
        {k: [] for k in ("rid", "uid", "row", "pos", "p", "tie")},
    )
    captions: dict[str, int] = {}
    text_parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        bar.update(len(batch))
        good = [ex for ex in batch if "skip_reason" not in ex]
        skipped.update(ex["skip_reason"] for ex in batch if "skip_reason" in ex)
        if not good:
            continue
        px = torch.stack([ex["pixel_values"] for ex in good])  # [b, 2, 3, R, R]
        b = px.shape[0]
        both = torch.cat([px, px.flip(-1)]).reshape(
            4 * b, *px.shape[2:]
        )  # [4b, 3, R, R]: normal then flipped
        with torch.no_grad():
            z = encode_images(both).detach().to("cpu", storage_dtype)
        z = z.reshape(2, b, 2, *z.shape[1:])
        lat.append(z[0])
        lat_f.append(z[1])
        new = []
        for ex in good:
            if ex["caption"] not in captions:
                captions[ex["caption"]] = len(captions)
                new.append(ex["caption"])
            cap_ids.append(captions[ex["caption"]])
        if new:
            with torch.no_grad():
                emb = encode_text(new)
            for name, t in emb.items():
                text_parts.setdefault(name, []).append(t.detach().to("cpu", storage_dtype))
        sizes.append(torch.stack([ex["original_sizes"] for ex in good]))
        crops.append(torch.stack([ex["crop_top_lefts"] for ex in good]))
        for ex in good:
            meta["rid"].append(ex["ranking_id"])
            meta["uid"].append(ex["user_id"])
            meta["row"].append(ex["row_index"])
            meta["pos"].append(ex["position"])
            meta["p"].append(ex["pref_prob"])
            meta["tie"].append(ex["is_tie"])
    if not lat:
        return {}, [], skipped
    original_sizes = torch.cat(sizes)
    crop_top_lefts = torch.cat(crops)
    tensors = {
        "latents": torch.cat(lat).contiguous(),
        "latents_flipped": torch.cat(lat_f).contiguous(),
        "caption_ids": torch.tensor(cap_ids, dtype=torch.long),
        "original_sizes": original_sizes,
        "crop_top_lefts": crop_top_lefts,
        "crop_top_lefts_flipped": _flipped_crops(transform, original_sizes, crop_top_lefts),
        "ranking_ids": torch.tensor(meta["rid"], dtype=torch.long),
        "user_ids": torch.tensor(meta["uid"], dtype=torch.long),
        "row_indices": torch.tensor(meta["row"], dtype=torch.long),
        "positions": torch.tensor(meta["pos"], dtype=torch.long),
        "pref_probs": torch.tensor(meta["p"], dtype=torch.float32),
        "is_tie": torch.tensor(meta["tie"], dtype=torch.bool),
    }
    for name, parts in text_parts.items():
        tensors[f"text.{name}"] = torch.cat(parts).contiguous()
    return tensors, list(captions), skipped


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


def build_latent_cache(
    pairs: PickAPicPairs,
    encode_images: EncodeImages,
    encode_text: EncodeText,
    *,
    cache_root: str | Path,
    model_id: str,
    batch_size: int = 16,
    shard_size: int = 1024,
    storage_dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    rebuild: bool = False,
    require_existing: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> CachedPairs:
    """Encode ``pairs`` once (or reuse a cache with the same key) and return a :class:`CachedPairs` over it.

    Args:
        pairs: the filtered pairs; their ``resolution`` is used with a centre crop (their crop/flip settings are
            not: see the module docstring).
        encode_images: ``[N, 3, R, R] in [-1, 1] -> [N, C, h, w]`` scaled latents; called once per batch with
            ``N = 4 * b`` (b pairs x (winner, loser) x (as is, flipped)), under ``torch.no_grad``.
        encode_text: ``list[str] -> {name: [N, ...]}``; called once per batch with the captions not yet seen in
            the current shard (text embeddings are de-duplicated per shard).
        cache_root: parent folder; the cache lives in ``<cache_root>/pairs-<digest16>``.
        model_id: identity of the encoders (see :func:`model_fingerprint`).
        batch_size: pairs per encoder call. shard_size: dataset positions per shard file.
        storage_dtype: dtype on disk: float32 (exact) or float16 (half the size, rounded: see the module
            docstring); part of the key. Reads are returned as float32.
        num_workers: DataLoader workers decoding JPEGs while encoding.
        rebuild: delete an existing cache with this key and encode again.
        require_existing: raise ``FileNotFoundError`` instead of encoding when no complete cache exists.
        random_flip, seed: passed to :class:`CachedPairs`.
    """
    key = cache_key(pairs, model_id, storage_dtype)
    digest = key_digest(key)
    directory = Path(cache_root) / f"pairs-{digest[:16]}"
    manifest_path = directory / "manifest.json"
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("digest") != digest:
            raise RuntimeError(
                f"{directory} holds a cache with another key (digest {manifest.get('digest')}, expected {digest}); "
                "delete the folder or pass rebuild=True"
            )
        log(f"latent cache: reusing {directory} ({manifest['num_pairs']:,} pairs)")
        return CachedPairs(directory, random_flip=random_flip, seed=seed, reused=True)
    if require_existing:
        raise FileNotFoundError(
            f"no complete latent cache at {directory} for this data/model/preprocessing key; build it first "
            "(build_latent_cache without require_existing=True)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "key.json", {"digest": digest, "key": key})
    n = len(pairs)
    num_shards = math.ceil(n / shard_size)
    source = _CenterPairs(pairs)
    bar = tqdm(total=n, desc="encoding latent cache", unit="pair", disable=not show_progress)
    shards = []
    for s in range(num_shards):
        start, stop = s * shard_size, min((s + 1) * shard_size, n)
        name = f"shard-{s:05d}"
        sidecar = directory / f"{name}.json"
        if sidecar.exists():  # completed by an interrupted earlier build
            shards.append(json.loads(sidecar.read_text()))
            bar.update(stop - start)
            continue
        loader = DataLoader(
            source,
            batch_size=batch_size,
            sampler=range(start, stop),
            num_workers=num_workers,
            collate_fn=list,
        )
        tensors, captions, skipped = _encode_shard(
            loader, pairs.transform, encode_images, encode_text, storage_dtype, bar
        )
        info = {"name": name, "num_pairs": 0, "positions": [start, stop], "skipped": dict(skipped)}
        if tensors:
            tmp = directory / f"{name}.safetensors.tmp"
            save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
            tmp.replace(directory / f"{name}.safetensors")
            info["num_pairs"] = int(tensors["latents"].shape[0])
            info["latent_shape"] = list(tensors["latents"].shape[2:])
            info["text_shapes"] = {
                k[5:]: list(v.shape[1:]) for k, v in tensors.items() if k.startswith("text.")
            }
        _write_json(sidecar, info)
        shards.append(info)
    bar.close()
    total_skipped: Counter = Counter()
    for info in shards:
        total_skipped.update(info["skipped"])
    filled = [info for info in shards if info["num_pairs"]]
    if not filled:
        raise ValueError(f"{pairs.source}: every pair failed to load while encoding ({dict(total_skipped)})")
    manifest = {
        "digest": digest,
        "key": key,
        "num_pairs": sum(info["num_pairs"] for info in shards),
        "shards": [{"name": i["name"], "num_pairs": i["num_pairs"]} for i in filled],
        "skipped_while_encoding": dict(total_skipped),
        "index_stats": pairs.stats.as_dict(),
        "latent_shape": filled[0]["latent_shape"],
        "text_shapes": filled[0]["text_shapes"],
    }
    _write_json(manifest_path, manifest)
    log(
        f"latent cache: built {directory} ({manifest['num_pairs']:,} pairs, {sum(total_skipped.values())} skipped)"
    )
    return CachedPairs(directory, random_flip=random_flip, seed=seed, reused=False)


# ----------------------------------------------------------------------------------------------------------------
# Reading


class CachedPairs(Dataset):
    """Pairs read from a latent cache, one memory-mapped slice per tensor per item (nothing is preloaded).

    Indexing: ``dataset[epoch * N + position]`` (see :mod:`diffalign.data.sampler`). With ``random_flip`` the
    orientation is ``default_rng([seed, epoch, position]).random(3)[2] < 0.5`` (same for winner and loser).

    Example keys: ``latents`` [2, C, h, w] float32 (winner, loser), ``text`` {name: tensor without the batch
    dim} float32, ``caption``, ``original_sizes``/``crop_top_lefts`` [2, 2] long (crops of the chosen
    orientation), ``flipped``, ``ranking_id``, ``user_id``, ``row_index``, ``position``, ``pref_prob``,
    ``is_tie``, ``skipped`` ({}).
    """

    def __init__(
        self, directory: str | Path, *, random_flip: bool = True, seed: int = 0, reused: bool | None = None
    ) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"{manifest_path} not found: not a complete latent cache (build_latent_cache)"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.random_flip = random_flip
        self.seed = seed
        self.reused = reused
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s["num_pairs"] for s in self.manifest["shards"]]).tolist()
        self.text_keys = sorted(self.manifest["text_shapes"])
        self._handles: OrderedDict[int, tuple[Any, list[str]]] = OrderedDict()
        self.max_open_shards = 32
        index = self.manifest.get("index_stats", {})
        self.stats = PairStats(
            source=f"{index.get('source', '?')} via latent cache {self.directory}",
            rows_seen=index.get("rows_seen", 0),
            pairs_indexed=self.manifest["num_pairs"],
            ties_kept=index.get("ties_kept", 0),
            limited=index.get("limited", 0),
            skipped=Counter(index.get("skipped", {})) + Counter(self.manifest["skipped_while_encoding"]),
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # file handles are per process
        return state

    def _shard(self, s: int) -> tuple[Any, list[str]]:
        if s in self._handles:
            self._handles.move_to_end(s)
            return self._handles[s]
        f = safe_open(str(self.directory / f"{self.shard_names[s]}.safetensors"), framework="pt")
        entry = (f, json.loads(f.metadata()["captions"]))
        self._handles[s] = entry
        if len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return entry

    def row_indices(self) -> np.ndarray:
        """The source row of every dataset position (int64 [len(self)]), read from the shards' metadata tensors."""
        parts = [self._shard(s)[0].get_tensor("row_indices").numpy() for s in range(len(self.shard_names))]
        return np.concatenate(parts).astype(np.int64)[: len(self)]

    def locate(self, position: int) -> tuple[int, int]:
        """Dataset position -> (shard number, row inside the shard)."""
        s = bisect.bisect_right(self.offsets, position) - 1
        return s, position - self.offsets[s]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        epoch, position = split_index(index, n)
        flip = bool(self.random_flip and example_rng(self.seed, epoch, position).random(3)[2] < 0.5)
        s, i = self.locate(position)
        f, captions = self._shard(s)

        def row(name: str) -> torch.Tensor:
            return f.get_slice(name)[i : i + 1][0]

        caption_id = int(row("caption_ids"))
        return {
            "latents": row("latents_flipped" if flip else "latents").float(),
            "text": {
                k: f.get_slice(f"text.{k}")[caption_id : caption_id + 1][0].float() for k in self.text_keys
            },
            "caption": captions[caption_id],
            "original_sizes": row("original_sizes"),
            "crop_top_lefts": row("crop_top_lefts_flipped" if flip else "crop_top_lefts"),
            "flipped": flip,
            "ranking_id": int(row("ranking_ids")),
            "user_id": int(row("user_ids")),
            "row_index": int(row("row_indices")),
            "position": position,
            "pref_prob": float(row("pref_probs")),
            "is_tie": bool(row("is_tie")),
            "skipped": {},
        }


def collate_cached(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack cached examples: ``latents`` [B, 2, C, h, w], ``text`` {name: [B, ...]}, ``captions``,
    ``original_sizes``/``crop_top_lefts`` [B, 2, 2], ``ranking_ids``/``user_ids``/``row_indices`` [B] long,
    ``label_w`` [B] float32 (P(slot 0 preferred): 1.0, 0.5 for a kept tie; as in
    :func:`~diffalign.data.pickapic.collate_pairs`), ``is_tie``/``flipped`` [B] bool, ``skipped`` {} (for
    :meth:`PairStats.add_batch`)."""
    return {
        "latents": torch.stack([ex["latents"] for ex in examples]),
        "text": {k: torch.stack([ex["text"][k] for ex in examples]) for k in examples[0]["text"]},
        **stack_pair_metadata(examples),
    }

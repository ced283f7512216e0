"""Prompts for the online loop (sample images for prompts -> score -> update), epoch by epoch, and the held-out
evaluation prompts kept apart from them.

Every epoch's prompts are a pure function of ``(source, seed, pool_size, exclude, epoch, n)``: nothing is carried
from one epoch to the next, so a run resumed at epoch ``e`` sees exactly the prompts it would have seen.

Sources
-------
- ``"sandbox-grammar"``: captions of the sandbox grammar (:mod:`diffalign.sandbox.captions`), drawn as the sandbox
  world draws them (``sample_spec`` then a uniform prefix, as ``sample_example`` does): most captions name a
  colour, few ask for an outline. The grammar has :func:`num_grammar_captions` = 30,240 distinct captions.

  * ``pool_size=N``: the pool is the first ``N`` distinct captions of a fixed seeded order of the grammar
    (:func:`grammar_prompts`), excluded captions skipped. The order is the world's draws
    (``default_rng([seed, 7919])``) for the first :data:`WORLD_DRAWS` draws — about 15,500 distinct captions;
    the rarest captions are too rare to reach by drawing — then the captions not yet drawn, in a seeded uniform
    order. A larger pool therefore extends a smaller one of the same seed.
  * ``pool_size=None``: unbounded: epoch ``e`` draws its ``n`` captions afresh from the world's distribution
    with ``default_rng([seed, 7927, e])`` (repeats within an epoch are possible, as in the world), an excluded
    caption being drawn again.

- a ``.txt`` file: one prompt per line; blank lines and repeats are dropped and counted.
- a PartiPrompts ``.tsv``, an HPSv2-style ``.json`` file or directory, ``"sandbox"`` or a Pick-a-Pic-schema
  Parquet directory (``split`` chooses the split): read by :func:`diffalign.eval.prompts.load_prompt_set`; the
  pool is the unique prompts in source order (``pool_size`` keeps the first ``N`` of them).

Epochs over a finite pool
-------------------------
The pool is walked through seeded permutations laid end to end: ``perm_0 + perm_1 + ...`` where ``perm_k`` is
``default_rng([seed, 6151, k]).permutation(len(pool))``; epoch ``e`` takes positions ``[e·n, (e+1)·n)``. Every
prompt is visited once before any repeats, ``n`` may exceed the pool (the slice then spans permutations), and
epoch ``e`` is computed from the one or few permutations its slice touches, without replaying epochs ``0..e-1``.
E.g. a pool of 10 with ``n = 4``: epoch 0 = perm_0[0:4], epoch 1 = perm_0[4:8], epoch 2 = perm_0[8:10] +
perm_1[0:2]. (The walk assumes the same ``n`` every epoch; resuming with another ``n`` re-slices the sequence.)

Evaluation prompts (:func:`eval_prompt_set`): for the grammar, captions from a different seed derivation
(``[seed, 104729]``); the trainer passes them as ``exclude`` to the training stream, so training and evaluation
prompts are disjoint. For other sources, the first ``n`` unique prompts of the source (of an evaluation split for
Pick-a-Pic data).

Importing this module does not import torch (only reading a Pick-a-Pic Parquet source does, through ``datasets``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError
from ..sandbox.captions import PREFIXES, caption_text, sample_spec
from ..sandbox.scene import BACKGROUNDS, OBJECT_COLORS, POSITIONS, SHAPES, SIZES
from .prompts import PromptSet, _dedupe, load_prompt_set

__all__ = [
    "GRAMMAR_SOURCE",
    "PromptStream",
    "eval_prompt_set",
    "grammar_captions",
    "grammar_prompts",
    "num_grammar_captions",
    "read_text_prompts",
]

GRAMMAR_SOURCE = "sandbox-grammar"

# Seed derivations: numpy SeedSequence keys [seed, salt, ...]; each salt is one independent stream.
_POOL_SALT = 7919  # the grammar's caption order for training pools (grammar_prompts, purpose="train")
_EVAL_SALT = 104729  # the grammar's caption order for evaluation prompts (purpose="eval")
_EPOCH_SALT = 7927  # unbounded grammar: the draws of epoch e are keyed [seed, 7927, e]
_PERM_SALT = 6151  # finite pools: permutation k is keyed [seed, 6151, k]

# eval_prompt_set's grammar splits: captions [0, n) and [n, 2n) of the eval order
_GRAMMAR_SPLITS = ("test_unique", "validation_unique")

WORLD_DRAWS = 50_000
"""Draws from the world's caption distribution before a grammar order continues uniformly with the captions not yet
drawn (50,000 draws, ~1 s, reach ~15,500 distinct captions; a pool of 10,000 needs ~21,000 draws)."""

_MAX_REDRAWS_PER_PROMPT = 1_000
"""Unbounded grammar: an epoch gives up (ConfigError) after ``1000·n + 10,000`` draws, when ``exclude`` holds
nearly all of the world's probability mass."""


# ---------------------------------------------------------------------------------------------------------------
# The sandbox grammar


def _draw_caption(rng: np.random.Generator) -> str:
    """One caption as the sandbox world draws it (``sample_example`` without the noise): a spec, then a prefix."""
    spec = sample_spec(rng)
    return caption_text(spec, PREFIXES[rng.integers(len(PREFIXES))])


@functools.cache
def grammar_captions() -> tuple[str, ...]:
    """Every distinct caption of the sandbox grammar, in a fixed enumeration order (30,240: 4 prefixes x 5 shapes x
    7 colours (6 or none) x 3 sizes x 6 positions x 6 backgrounds x 2 (outline or not))."""
    from ..sandbox.captions import CaptionSpec

    opt = lambda values: (None, *values)  # noqa: E731  (an attribute the caption may leave open)
    out = [
        caption_text(CaptionSpec(shape, color, size, position, background, outline), prefix)
        for prefix, shape, color, size, position, background, outline in itertools.product(
            PREFIXES, SHAPES, opt(OBJECT_COLORS), opt(SIZES), opt(POSITIONS), opt(BACKGROUNDS), (None, True)
        )
    ]
    assert len(set(out)) == len(out), "sandbox captions are expected to be distinct per (spec, prefix)"
    return tuple(out)


@functools.cache
def _grammar_set() -> frozenset[str]:
    return frozenset(grammar_captions())


def num_grammar_captions() -> int:
    """How many distinct captions the sandbox grammar has (30,240)."""
    return len(grammar_captions())


def _clean_exclude(exclude: Iterable[str]) -> frozenset[str]:
    if isinstance(exclude, str):
        raise ConfigError(f"exclude must be a collection of prompts, not one string ({exclude!r})")
    return frozenset(s.strip() for s in exclude if s and s.strip())


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"prompt seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _grammar_order(n: int, key: list[int], exclude: frozenset[str]) -> list[str]:
    """The first ``n`` captions of the seeded grammar order keyed ``key`` that are not in ``exclude``."""
    available = num_grammar_captions() - len(exclude & _grammar_set())
    if n > available:
        raise ConfigError(
            f"{GRAMMAR_SOURCE}: {n} distinct prompts asked for, but the sandbox grammar has only "
            f"{num_grammar_captions()} distinct captions ({available} once the {num_grammar_captions() - available} "
            "excluded ones are left out): ask for fewer (prompt_pool_size), or none for an unbounded stream"
        )
    rng = np.random.default_rng(key)
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(WORLD_DRAWS):
        if len(out) >= n:
            return out
        caption = _draw_caption(rng)
        if caption in seen:
            continue
        seen.add(caption)
        if caption not in exclude:
            out.append(caption)
    # All WORLD_DRAWS draws were made (so rng's state is the same whatever n is): the rest uniformly.
    rest = [c for c in grammar_captions() if c not in seen]
    for i in rng.permutation(len(rest)):
        if len(out) >= n:
            break
        if rest[i] not in exclude:
            out.append(rest[i])
    return out


def grammar_prompts(
    n: int, seed: int, exclude: Iterable[str] = (), *, purpose: Literal["train", "eval"] = "train"
) -> list[str]:
    """``n`` distinct sandbox captions: the first ``n`` of the seeded grammar order (module docstring) that are not
    in ``exclude``. ``purpose`` chooses the seed derivation: ``"train"`` (``[seed, 7919]``, the training pools) or
    ``"eval"`` (``[seed, 104729]``, :func:`eval_prompt_set`), so that the two never start alike.

    Raises:
        ConfigError: ``n`` exceeds the grammar's distinct captions (less the excluded ones), or ``n < 1``.
    """
    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
    if n < 1:
        raise ConfigError(f"{GRAMMAR_SOURCE}: the number of prompts must be >= 1, got {n}")
    salt = _POOL_SALT if purpose == "train" else _EVAL_SALT
    return _grammar_order(int(n), [_check_seed(seed), salt], _clean_exclude(exclude))


# ---------------------------------------------------------------------------------------------------------------
# File and dataset sources


def read_text_prompts(path: str | Path) -> PromptSet:
    """A ``.txt`` file of prompts, one per line, stripped; blank lines and repeats dropped and counted.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} not found (expected a .txt file with one prompt per line)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return _dedupe([(line, None, {}) for line in lines], path.name)


def _uses_split(source: str) -> bool:
    """Whether ``source`` is read as a Pick-a-Pic-schema dataset (so ``split`` matters), as load_prompt_set decides."""
    p = Path(source)
    if source == "sandbox":
        return True
    if p.suffix.lower() in (".txt", ".tsv", ".json"):
        return False
    return not (p.is_dir() and any(p.glob("*.json")) and not any(p.rglob("*.parquet")))


def _label(source: str, split: str) -> str:
    return f"prompt source {source!r}" + (f" split {split!r}" if _uses_split(source) else "")


def _read_source(source: str, split: str) -> PromptSet:
    """The unique prompts of a file or dataset source; every failure a one-line ConfigError naming the source."""
    if source != "sandbox" and not Path(source).exists():
        raise ConfigError(
            f"prompt source {source!r} not found: give {GRAMMAR_SOURCE!r}, a .txt file (one prompt per line), a "
            "PartiPrompts .tsv, HPSv2-style .json file(s) or directory, 'sandbox' or a Pick-a-Pic-schema Parquet "
            "directory"
        )
    try:
        if Path(source).suffix.lower() == ".txt":
            return read_text_prompts(source)
        return load_prompt_set(source, split)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        detail = " ".join(str(err).split())
        raise ConfigError(f"{_label(source, split)} cannot be read: {detail}") from err


# ---------------------------------------------------------------------------------------------------------------
# The stream


class PromptStream:
    """Prompts for online training, epoch by epoch.

    Args:
        source: ``"sandbox-grammar"``, a ``.txt`` file, a PartiPrompts ``.tsv``, HPSv2-style ``.json`` file(s) /
            directory, ``"sandbox"`` or a Pick-a-Pic-schema Parquet directory (module docstring).
        seed: keys the pool (grammar) and the epochs' order; ``>= 0``.
        pool_size: the grammar: the number of distinct prompts (``None``: unbounded, fresh draws each epoch); a file
            or dataset: keep the first ``pool_size`` unique prompts (``None`` or more than the source holds: all).
        exclude: prompts never to give (the evaluation prompts); stripped, matched exactly.
        split: the split of a Pick-a-Pic-schema source.

    Attributes:
        num_prompts: the size of the pool, ``None`` when unbounded.
        pool: the pool in source order (``None`` when unbounded).
        dropped: rows of the source not used, by reason (``{"empty": 2, "duplicate": 5}``).
        excluded: how many of the ``exclude`` prompts were in the source (and so left out).

    Raises:
        ConfigError: a missing or unreadable source, an empty pool (after ``exclude``), a grammar ``pool_size``
            beyond the grammar's distinct captions, a bad ``seed`` or ``pool_size``; one line, naming the source.
    """

    num_prompts: int | None

    def __init__(
        self,
        source: str,
        *,
        seed: int = 0,
        pool_size: int | None = None,
        exclude: Iterable[str] = (),
        split: str = "train",
    ) -> None:
        self.source = str(source)
        self.seed = _check_seed(seed)
        self.split = split
        if pool_size is not None and (isinstance(pool_size, bool) or int(pool_size) < 1):
            raise ConfigError(
                f"{_label(self.source, split)}: pool_size must be >= 1 or None, got {pool_size!r}"
            )
        self.pool_size = None if pool_size is None else int(pool_size)
        self._exclude = _clean_exclude(exclude)
        self.dropped: dict[str, int] = {}
        self._source_total = 0  # unique prompts of a file source, before exclude and pool_size
        self._perm_cache: tuple[int, np.ndarray] | None = None

        if self.source == GRAMMAR_SOURCE:
            self.excluded = len(self._exclude & _grammar_set())
            if self.pool_size is None:
                if self.excluded >= num_grammar_captions():
                    raise ConfigError(
                        f"{GRAMMAR_SOURCE}: every caption of the grammar is excluded: no prompts left"
                    )
                self.pool: tuple[str, ...] | None = None
            else:
                self.pool = tuple(_grammar_order(self.pool_size, [self.seed, _POOL_SALT], self._exclude))
        else:
            prompt_set = _read_source(self.source, split)
            self.dropped = {k: v for k, v in prompt_set.dropped.items() if v}
            self._source_total = len(prompt_set)
            self._source_name = prompt_set.source
            kept = [p for p in prompt_set.prompts if p not in self._exclude]
            self.excluded = len(prompt_set) - len(kept)
            if not kept:
                raise ConfigError(
                    f"{_label(self.source, split)} has no prompts left ({self._counts()}): give a source with "
                    "prompts" + (", or exclude fewer" if self.excluded else "")
                )
            if self.pool_size is not None:
                kept = kept[: self.pool_size]
            self.pool = tuple(kept)
        self.num_prompts = None if self.pool is None else len(self.pool)

    # -- epochs --------------------------------------------------------------------------------------------------

    def epoch_prompts(self, epoch: int, n: int) -> list[str]:
        """The ``n`` prompts of epoch ``epoch`` (module docstring: a slice of the permutation walk, or fresh grammar
        draws when unbounded). Depends only on the constructor's arguments, ``epoch`` and ``n``."""
        if isinstance(epoch, bool) or int(epoch) < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if isinstance(n, bool) or int(n) < 1:
            raise ConfigError(f"prompts per epoch must be >= 1, got {n!r}")
        epoch, n = int(epoch), int(n)
        if self.pool is None:
            return self._unbounded_epoch(epoch, n)
        size = len(self.pool)
        start, end = epoch * n, (epoch + 1) * n
        out: list[str] = []
        for k in range(start // size, (end - 1) // size + 1):
            perm = self._permutation(k)
            lo, hi = max(start - k * size, 0), min(end - k * size, size)
            out += [self.pool[i] for i in perm[lo:hi]]
        return out

    def _permutation(self, k: int) -> np.ndarray:
        """Permutation ``k`` of the pool's indices (the last one is kept: consecutive epochs mostly share one)."""
        if self._perm_cache is None or self._perm_cache[0] != k:
            perm = np.random.default_rng([self.seed, _PERM_SALT, k]).permutation(len(self.pool))
            self._perm_cache = (k, perm)
        return self._perm_cache[1]

    def _unbounded_epoch(self, epoch: int, n: int) -> list[str]:
        rng = np.random.default_rng([self.seed, _EPOCH_SALT, epoch])
        out: list[str] = []
        budget = _MAX_REDRAWS_PER_PROMPT * n + 10_000
        for _ in range(budget):
            caption = _draw_caption(rng)
            if caption not in self._exclude:
                out.append(caption)
                if len(out) == n:
                    return out
        raise ConfigError(
            f"{GRAMMAR_SOURCE}: {budget} draws gave only {len(out)} of {n} prompts not excluded: the "
            f"{self.excluded} excluded captions hold nearly all of the sandbox world's captions; exclude fewer"
        )

    # -- reporting -----------------------------------------------------------------------------------------------

    def _counts(self) -> str:
        parts = [f"dropped {v} {k}" for k, v in self.dropped.items() if v]
        if self._exclude:
            parts.append(f"excluded {self.excluded} of {len(self._exclude)} given")
        return ", ".join(parts) or "nothing dropped"

    def describe(self) -> str:
        """One line: the source, the pool's size and what was dropped or excluded (counts)."""
        if self.source == GRAMMAR_SOURCE:
            if self.pool is None:
                head = (
                    f"{GRAMMAR_SOURCE} (seed {self.seed}): unbounded, drawn afresh each epoch from the sandbox "
                    f"world's captions ({num_grammar_captions()} distinct exist)"
                )
            else:
                head = (
                    f"{GRAMMAR_SOURCE} (seed {self.seed}): pool of {len(self.pool)} distinct captions of the "
                    f"grammar's {num_grammar_captions()}"
                )
        else:
            name = self._source_name
            if (
                self.pool_size is not None
                and len(self.pool) == self.pool_size < self._source_total - self.excluded
            ):
                head = f"{name}: pool of the first {len(self.pool)} of {self._source_total - self.excluded} prompts"
            else:
                head = f"{name}: pool of {len(self.pool)} prompts"
        return f"{head} ({self._counts()})"

    def __repr__(self) -> str:
        return f"PromptStream({self.describe()})"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation prompts


def eval_prompt_set(source: str, n: int | None, seed: int = 0, *, split: str = "test_unique") -> list[str]:
    """The held-out evaluation prompts of a source; pass them as ``exclude`` to the training :class:`PromptStream`.

    - ``"sandbox-grammar"``: ``n`` distinct captions of ``grammar_prompts(2n, seed, purpose="eval")`` (seed
      derivation ``[seed, 104729]``, not the training pools' ``[seed, 7919]``); ``n`` is required. ``split``
      ``test_unique`` takes the first ``n`` of that order, ``validation_unique`` the next ``n`` (disjoint: tune on
      these, report on the test ones).
    - a file or dataset: its first ``n`` unique prompts (``None``: all); for Pick-a-Pic-schema data, of ``split``
      (an evaluation split: ``test_unique``, ``validation_unique``).

    Raises:
        ConfigError: as :class:`PromptStream` (missing source, no prompts, ``n`` beyond the grammar), or ``n < 1``.
    """
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise ConfigError(f"the number of evaluation prompts must be >= 1 or None, got {n!r}")
    if source == GRAMMAR_SOURCE:
        if n is None:
            raise ConfigError(
                f"{GRAMMAR_SOURCE} evaluation prompts need a number (eval_num_prompts): the grammar has "
                f"{num_grammar_captions()} captions"
            )
        n = int(n)
        if split not in _GRAMMAR_SPLITS:
            raise ConfigError(
                f"{GRAMMAR_SOURCE} evaluation prompts have the splits {', '.join(_GRAMMAR_SPLITS)}, got eval_split "
                f"{split!r}: give one of them"
            )
        offset = _GRAMMAR_SPLITS.index(split) * n
        return grammar_prompts(offset + n, seed, purpose="eval")[offset:]
    prompts = _read_source(str(source), split).prompts
    if not prompts:
        raise ConfigError(f"{_label(str(source), split)} has no prompts: give a source with prompts")
    return prompts if n is None else prompts[: int(n)]

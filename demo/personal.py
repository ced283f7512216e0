"""The demo's personalised mode (PPD, issue #13), without any user interface: whose taste, from which 4 pairs, and
the base / personalised images of one prompt and seed.

A PPD run (``accelerate launch scripts/train_diffusion_dpo.py --config configs/sandbox_ppd.yaml``, written to
``outputs/ppd-sandbox``) holds a LoRA, a user cross-attention branch and a user encoder. The encoder turns a few
``(caption, preferred image, rejected image)`` pairs into user tokens; the branch reads them. The page gets those
pairs in one of two ways:

- **a sandbox user**: one of the *unseen* users of the sandbox-ppd data (never in training), described from their
  taste weights; their first 4 context pairs are embedded, as the run's own evaluation does
  (:func:`diffalign.eval.personal.user_tokens`), and each image carries that user's score;
- **your answers**: 4 fixed pairs of the sandbox-ppd ``context`` split (:func:`question_pairs`), each chosen to
  ask about one taste axis; "left is better / right is better" decides which image is the preferred one.

Base image = the run's pipeline with its adapters disabled and no tokens (the model the run started from, bit for
bit); personalised image = LoRA on, tokens in. Both start from the same seeded noise
(:func:`diffalign.eval.compare.generate`'s rule), so they differ only by the personalisation.

``demo/app.py`` lays this out in the "Personalised" tab; everything here is tested without Gradio
(``tests/test_demo_ppd.py``). The run and data directories come from the command line only (``--ppd-run``,
``--ppd-data``), never from the page, so no path typed by a visitor is opened here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from demo.core import InputError, Request
from diffalign.data.ppd_questionnaire import axis_values
from diffalign.errors import ConfigError
from diffalign.sandbox import REPO_ROOT
from diffalign.sandbox.user_population import AXES, PopulationUser

DEFAULT_PPD_RUN = REPO_ROOT / "outputs" / "ppd-sandbox"
DEFAULT_PPD_DATA = "sandbox-ppd"
TRAIN_COMMAND = "accelerate launch scripts/train_diffusion_dpo.py --config configs/sandbox_ppd.yaml"
# A caption that leaves size, position, colour, background and outline open: the user's taste decides all of them
# (a fully specified caption leaves a taste nothing to move).
DEFAULT_PERSONAL_PROMPT = "a circle"
NUM_PAIRS = 4  # k: the run is trained and evaluated with 4 context pairs per user
LEFT, RIGHT = "left is better", "right is better"
SOURCE_USER, SOURCE_ANSWERS = "a sandbox user", "my 4 answers"
LORA_FILE = "pytorch_lora_weights.safetensors"

# How each signed taste axis reads, (a > 0, a < 0) (diffalign.sandbox.user_population.AXES).
AXIS_WORDS: dict[str, tuple[str, str]] = {
    "size": ("large objects", "small objects"),
    "background": ("light backgrounds", "dark backgrounds"),
    "temperature": ("warm colours", "cool colours"),
    "contrast": ("high contrast", "muted contrast"),
    "centred": ("centred objects", "off-centre objects"),
    "outlined": ("outlined shapes", "plain shapes"),
}
MIN_AXIS = 0.05  # of sum |a| = 1: axes below this are noise, not worth a word


# ---------------------------------------------------------------------------------------------------------------
# The run directory


def ppd_status(run_dir: str | Path) -> tuple[bool, str]:
    """``(ok, one sentence)``: whether ``run_dir`` holds a PPD run (LoRA, user attention, user encoder). Checked
    before anything loads, so the page can say what is missing, and how to train it, instead of failing on a click."""
    run = Path(run_dir)
    lora = next((d for d in (run / "lora", run) if (d / LORA_FILE).is_file()), None)
    needed = {
        f"lora/{LORA_FILE}": lora is not None,
        "user_attention.safetensors": (run / "user_attention.safetensors").is_file(),
        "user_encoder/user_encoder.json": (run / "user_encoder" / "user_encoder.json").is_file(),
        "user_encoder/user_projector.safetensors": (
            run / "user_encoder" / "user_projector.safetensors"
        ).is_file(),
    }
    missing = [name for name, found in needed.items() if not found]
    if not missing:
        return True, f"PPD run `{run}`: LoRA, user attention and user encoder found."
    what = "the directory does not exist" if not run.is_dir() else "missing " + ", ".join(missing)
    return False, (
        f"No trained personalised (PPD) model at `{run}` ({what}): train one with `{TRAIN_COMMAND}`, "
        "or start the demo with `--ppd-run DIR`."
    )


# ---------------------------------------------------------------------------------------------------------------
# Users and their pairs


def describe_user(user: PopulationUser, max_axes: int = 3) -> str:
    """A short reading of a user's taste from their weights, strongest axis first: ``"likes large objects, dark
    backgrounds, warm colours"``, so a visitor can guess what the personalised image should move towards. A weak
    user (taste barely moves their score) is said to be so."""
    axes = axis_values(np.asarray(user.weights))
    axes = axes / max(float(np.abs(axes).sum()), 1e-12)
    order = sorted(range(len(AXES)), key=lambda i: -abs(axes[i]))
    liked = [AXIS_WORDS[AXES[i]][0 if axes[i] > 0 else 1] for i in order if abs(axes[i]) >= MIN_AXIS]
    text = "likes " + ", ".join(liked[:max_axes]) if liked else "no particular taste"
    if user.kind == "weak":
        text += " (only slightly: ranks almost like the judge)"
    return text


def user_label(user: PopulationUser) -> str:
    """The dropdown entry: ``"1042 · strong · likes large objects, …"``."""
    return f"{user.user_id} · {user.kind} · {describe_user(user)}"


@dataclass(frozen=True)
class QuestionPair:
    """One pair a visitor answers: a caption and two JPEGs (as stored in the data), and the taste axis it asks
    about (the axis on which its two images differ most, among those the caption leaves open)."""

    caption: str
    left: bytes
    right: bytes
    axis: str


def question_pairs(data_dir: str | Path, n: int = NUM_PAIRS) -> list[QuestionPair]:
    """The build's questionnaire (:func:`diffalign.data.ppd_questionnaire.load_questions`): the ``n`` pairs every
    user of the build answers in its ``questionnaire`` split, one per taste axis, which
    ``configs/sandbox_ppd_questionnaire.yaml`` trains and evaluates on — so the visitor is asked exactly what the
    model learned to read. A build older than the questionnaire (or with fewer questions) gets them chosen here from
    its ``context`` split by the same rule (:func:`~diffalign.data.ppd_questionnaire.select_questions`). The same
    pairs for every visitor."""
    import pyarrow.parquet as pq

    from diffalign.data.ppd import CONTEXT_SPLIT
    from diffalign.data.ppd_questionnaire import (
        QUESTIONNAIRE_SPLIT,
        distinct_pairs,
        load_questions,
        select_questions,
    )
    from diffalign.data.schema import split_path
    from diffalign.eval.personal import resolve_ppd_dir

    build = resolve_ppd_dir(data_dir)
    if split_path(build, QUESTIONNAIRE_SPLIT).is_file():
        stored = load_questions(build)
        if len(stored) >= n:
            return [QuestionPair(q["caption"], q["left"], q["right"], q["axis"]) for q in stored[:n]]
    path = split_path(build, CONTEXT_SPLIT)
    columns = ["caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid"]
    table = pq.read_table(path, columns=columns).to_pylist()
    rows = [table[i] for i in distinct_pairs(table)]  # each source pair once (users share pairs)
    if len(rows) < n:
        raise ConfigError(f"{path} has {len(rows)} distinct pairs; {n} are needed for the questions")
    return [
        QuestionPair(rows[i]["caption"], rows[i]["jpg_0"], rows[i]["jpg_1"], axis)
        for i, axis in select_questions(rows, n)
    ]


def pairs_for_answers(
    questions: Sequence[QuestionPair], answers: Sequence[str | None]
) -> list[tuple[str, Any, Any]]:
    """The visitor's context pairs ``(caption, preferred, rejected)``: per question, the image they said is better
    first. ``answers``: :data:`LEFT` / :data:`RIGHT` (or ``"left"`` / ``"right"``), one per question; a missing one
    raises :class:`~demo.core.InputError` naming the pair (an unanswered pair states no preference)."""
    if len(answers) != len(questions):
        raise InputError(f"answer all {len(questions)} pairs (got {len(answers)} answers)")
    out = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True), start=1):
        side = (a or "").strip().lower().split(" ")[0]
        if side not in ("left", "right"):
            raise InputError(
                f"answer all {len(questions)} pairs: pair {i} has no answer (left or right is better)"
            )
        out.append((q.caption, q.left, q.right) if side == "left" else (q.caption, q.right, q.left))
    return out


def sandbox_user_pairs(
    data_dir: str | Path, user_id: int, k: int = NUM_PAIRS, split: str = "context"
) -> list[tuple[str, Any, Any]]:
    """A sandbox user's first ``k`` pairs ``(caption, preferred, rejected)`` of ``split`` (the run's context split:
    its random ``context`` pairs, or its ``questionnaire`` answers): the pairs the run's own per-user evaluation
    embeds (:func:`diffalign.eval.personal.user_tokens`), so the page shows what it measured."""
    from diffalign.data.ppd import load_context_pairs

    pairs = load_context_pairs(data_dir, int(user_id), split)
    if len(pairs) < k:
        raise ConfigError(f"user {user_id} has {len(pairs)} {split} pairs in {data_dir}; {k} are needed")
    return [(p["caption"], p["preferred"], p["rejected"]) for p in pairs[:k]]


# ---------------------------------------------------------------------------------------------------------------
# Generation and scores


def personal_pair(
    pipe: Any,
    encoder: Any,
    prompt: str,
    seed: int,
    context_pairs: Sequence[tuple[str, Any, Any]],
    steps: int = 20,
    guidance: float = 5.0,
    *,
    user_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(base, personalised)``, each ``[H, W, 3]`` uint8, from the same seed: base = adapters disabled and no user
    tokens (the starting model), personalised = LoRA on and the tokens of ``context_pairs`` in every attention."""
    from diffalign.eval.compare import generate
    from diffalign.eval.personal import base_context, generate_personalized

    with torch.no_grad():
        tokens = encoder.embed(list(context_pairs))
    with base_context(pipe):
        base = generate(pipe, [prompt], [int(seed)], steps=steps, guidance=guidance, desc="base")
    mine = generate_personalized(
        pipe, [prompt], [int(seed)], tokens, steps=steps, guidance=guidance, user_scale=user_scale
    )
    return base[0], mine[0]


def user_scores(user: PopulationUser, images: Sequence[np.ndarray], prompt: str) -> np.ndarray:
    """``user``'s score (``overall + strength · taste``) of each image, ``[len(images)]``; ``ValueError`` for a
    prompt outside the sandbox grammar (the judge cannot read it)."""
    return user.score(np.stack(list(images)), [prompt] * len(images))


def score_lines(
    user: PopulationUser | None, base: np.ndarray, personal: np.ndarray, prompt: str
) -> tuple[str, str, str]:
    """Markdown under the base and personalised images and a verdict line; empty without a sandbox user (a
    visitor's own answers have no score function: they are the judge)."""
    if user is None:
        return "", "", "Embedded from your 4 answers."
    try:
        b, p = user_scores(user, [base, personal], prompt)
    except ValueError as err:
        note = f"⚠️ user {user.user_id}'s score needs a caption of the sandbox grammar ({err})"
        return note, note, f"Embedded from user {user.user_id}'s 4 context pairs."
    name = f"**user {user.user_id}'s score**"
    d = p - b
    verdict = (
        "prefers the personalised image" if d > 1e-6 else "prefers the base image" if d < -1e-6 else "ties"
    )
    return (
        f"{name} {b:.3f}",
        f"{name} {p:.3f}",
        f"Embedded from user {user.user_id}'s 4 context pairs; user {user.user_id} {verdict} ({d:+.3f}).",
    )


# ---------------------------------------------------------------------------------------------------------------
# The engine the tab calls


@dataclass
class PersonalConfig:
    """What the command line sets: ``--ppd-run``, ``--ppd-data``, ``--ppd-base``, ``--device``, ``--dtype``."""

    run_dir: str | Path = DEFAULT_PPD_RUN
    data: str | Path = (
        DEFAULT_PPD_DATA  # a sandbox-ppd build directory, or the name (built once into the cache)
    )
    base: str = "sandbox"  # the pipeline the run was trained from
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    k: int = NUM_PAIRS


@dataclass
class PersonalResult:
    """One click: both images ``[H, W, 3]``, the markdown under each and a note."""

    base: np.ndarray
    personal: np.ndarray
    base_md: str
    personal_md: str
    note: str


@dataclass
class PersonalEngine:
    """Data (users, questions) read once, the run loaded on the first click, one generation at a time."""

    config: PersonalConfig = field(default_factory=PersonalConfig)
    _data_dir: Path | None = field(default=None, repr=False)
    _users: dict[int, PopulationUser] | None = field(default=None, repr=False)
    _questions: list[QuestionPair] | None = field(default=None, repr=False)
    _models: tuple[Any, Any] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prepare(self) -> tuple[bool, str]:
        """:func:`ppd_status`, then the data (the sandbox-ppd build is made on first use, about a minute): the
        page shows the tab's controls only when both are there, and the sentence saying why not otherwise."""
        ok, message = ppd_status(self.config.run_dir)
        if not ok:
            return ok, message
        try:
            self.users()
            self.questions()
        except (ConfigError, OSError, ValueError) as err:
            return False, f"The PPD data `{self.config.data}` could not be read: {err}"
        return True, message

    def data_dir(self) -> Path:
        if self._data_dir is None:
            from diffalign.eval.personal import resolve_ppd_dir

            self._data_dir = resolve_ppd_dir(self.config.data)
        return self._data_dir

    def users(self) -> dict[int, PopulationUser]:
        """The unseen users of the build, by id (sorted)."""
        if self._users is None:
            from diffalign.eval.personal import population_users, unseen_user_ids

            everyone = population_users(self.data_dir())
            self._users = {uid: everyone[uid] for uid in unseen_user_ids(self.data_dir())}
        return self._users

    def user_choices(self) -> list[tuple[str, int]]:
        """``(label, id)`` per unseen user, for the dropdown."""
        return [(user_label(u), uid) for uid, u in self.users().items()]

    def questions(self) -> list[QuestionPair]:
        if self._questions is None:
            self._questions = question_pairs(self.data_dir(), self.config.k)
        return self._questions

    def models(self) -> tuple[Any, Any]:
        """``(pipe, encoder)`` of the run, loaded once (:func:`diffalign.eval.personal.load_personalized`)."""
        if self._models is None:
            from diffalign.eval.personal import load_personalized

            cfg = self.config
            self._models = load_personalized(cfg.base, cfg.run_dir, device=cfg.device, dtype=cfg.dtype)
        return self._models

    def context(
        self, source: str, user_id: Any, answers: Sequence[str | None]
    ) -> tuple[list[tuple[str, Any, Any]], PopulationUser | None]:
        """The context pairs of a click and the sandbox user they belong to (``None`` for the visitor's answers)."""
        if source == SOURCE_ANSWERS:
            return pairs_for_answers(self.questions(), answers), None
        if source != SOURCE_USER:
            raise InputError(f"choose whose taste: {SOURCE_USER!r} or {SOURCE_ANSWERS!r}, got {source!r}")
        try:
            uid = int(user_id)
        except (TypeError, ValueError):
            raise InputError("pick a sandbox user from the list") from None
        if uid not in self.users():
            raise InputError(f"user {uid} is not one of the {len(self.users())} unseen users of the data")
        from diffalign.eval.personal import run_context_split

        split = run_context_split(self.config.run_dir)
        return sandbox_user_pairs(self.data_dir(), uid, self.config.k, split), self.users()[uid]

    def run(self, source: str, user_id: Any, answers: Sequence[str | None], req: Request) -> PersonalResult:
        """Base and personalised images of ``req``'s prompt and first seed (``req`` checked by
        :func:`~demo.core.validate_request`), with the sandbox user's scores when one was picked."""
        ok, message = ppd_status(self.config.run_dir)
        if not ok:
            raise ConfigError(message)
        pairs, user = self.context(source, user_id, answers)
        from diffalign.eval.personal import run_user_scale

        scale = req.scale * run_user_scale(self.config.run_dir)  # the slider's 1 is the branch as trained
        with self._lock:  # one generation at a time: the pipeline's adapters are switched off and on
            pipe, encoder = self.models()
            base, mine = personal_pair(
                pipe, encoder, req.prompt, req.seeds[0], pairs, req.steps, req.guidance, user_scale=scale
            )
        return PersonalResult(base, mine, *score_lines(user, base, mine, req.prompt))

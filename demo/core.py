"""The demo's unit, without any user interface: where models may come from, how they load, generation with shared
seeds, scoring with catalog rewards, and the gallery tally.

``demo/app.py`` only lays these out in Gradio; everything here is tested without a browser
(``tests/test_demo_core.py``).

Model paths and safety
----------------------
Model-path fields are typed by whoever opens the page, so they are *untrusted*: a path is resolved
(``Path.resolve``: symlinks and ``..`` followed) and accepted only if it lies under one of the allowed roots
(default: ``demo/assets``, the sandbox assets folder, ``outputs/``; more via ``--allow-root`` or the
``DIFFALIGN_DEMO_ROOTS`` environment variable). Nothing outside is opened, and whether it exists is not revealed.
Hub ids (``org/name``) are refused unless the app was started with ``--allow-hub``.

Aligned model kinds (:func:`resolve_aligned`)
---------------------------------------------
``D`` is the directory given as the aligned model:

==========  =====================================================================================================
lora        ``D/pytorch_lora_weights.safetensors`` (a LoRA export, or a training ``checkpoint-N``), or
            ``D/lora/pytorch_lora_weights.safetensors`` (a training run's output directory)
pipeline    ``D/model_index.json`` (a full pipeline; its ``unet/`` is used with the base's other components)
unet        ``D/config.json`` + ``diffusion_pytorch_model*.safetensors`` (a UNet directory), or ``D/unet/``
unet_state  ``D/model.safetensors`` + ``D/train_state.json`` (a full fine-tuning ``checkpoint-N``: accelerate's
            saved UNet state dict, loaded into the base UNet's architecture)
run         ``D/checkpoint-N/`` folders only: the newest one that holds one of the above
==========  =====================================================================================================

The LoRA-scale slider ``s`` interpolates: for a LoRA, ``W = W_base + s · (α/r) · B A`` (diffusers'
``set_adapters(["aligned"], adapter_weights=[s])``); for a full model the weights are interpolated,
``θ = θ_base + s · (θ_aligned − θ_base)`` (``torch.lerp``). ``s = 0`` is the base model, ``s = 1`` the aligned one.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffalign.eval.compare import adapters_disabled, generate
from diffalign.eval.stats import paired_win_rate
from diffalign.sandbox import ASSETS_DIR, REPO_ROOT, SANDBOX_PIPELINE

DEMO_DIR = Path(__file__).resolve().parent
DEFAULT_ALIGNED = DEMO_DIR / "assets" / "sandbox-dpo-lora"
DEFAULT_PROMPT = "a large red circle on the left on a white background"
DEFAULT_REWARD = "sandbox-judge"
ROOTS_ENV = "DIFFALIGN_DEMO_ROOTS"
LORA_FILE = "pytorch_lora_weights.safetensors"
# The sandbox judge's headline scores, in display order (the "pf/<attr>" details are left out of the page).
JUDGE_KEYS = ("overall", "prompt_following", "aesthetic", "fidelity", "harmlessness")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class InputError(ValueError):
    """An input a person typed is out of bounds; the message says which field and the allowed range."""


class ModelPathError(ValueError):
    """A model path is not allowed or does not hold a model the demo can load."""


# ---------------------------------------------------------------------------------------------------------------
# Input bounds


@dataclass(frozen=True)
class Limits:
    """Bounds for every number and text a person can enter (checked server-side, whatever the widgets allow)."""

    max_prompt_chars: int = 300
    min_steps: int = 1
    max_steps: int = 100
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_seed: int = 2**32 - 1  # torch.Generator.manual_seed accepts [0, 2^64); 32 bits is what people type
    max_images: int = 8  # gallery: seeds per click (each seed is two images)
    min_scale: float = 0.0
    max_scale: float = 2.0


@dataclass(frozen=True)
class Request:
    """A validated generation request: ``seeds`` are ``first_seed, first_seed + 1, …`` (one per gallery column)."""

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    scale: float


def _as_int(value, name: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    return int(f)


def _as_float(value, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return f


def validate_request(
    prompt,
    negative_prompt,
    seed,
    steps,
    guidance,
    num_images=1,
    scale=1.0,
    limits: Limits = Limits(),
) -> Request:
    """Check every field against ``limits``; raise :class:`InputError` naming the field and its range."""
    prompt = "" if prompt is None else str(prompt).strip()
    if not prompt:
        raise InputError("the prompt is empty: type a caption, e.g. " + repr(DEFAULT_PROMPT))
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(
            f"the prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are allowed"
        )
    negative = "" if negative_prompt is None else str(negative_prompt).strip()
    if len(negative) > limits.max_prompt_chars:
        raise InputError(
            f"the negative prompt has {len(negative)} characters; at most {limits.max_prompt_chars} are allowed"
        )
    steps_i = _as_int(steps, "steps")
    if not limits.min_steps <= steps_i <= limits.max_steps:
        raise InputError(f"steps must be between {limits.min_steps} and {limits.max_steps}, got {steps_i}")
    g = _as_float(guidance, "guidance")
    if not limits.min_guidance <= g <= limits.max_guidance:
        raise InputError(
            f"guidance must be between {limits.min_guidance:g} and {limits.max_guidance:g}, got {g:g}"
        )
    n = _as_int(num_images, "number of seeds")
    if not 1 <= n <= limits.max_images:
        raise InputError(f"number of seeds must be between 1 and {limits.max_images}, got {n}")
    s0 = _as_int(seed, "seed")
    if s0 < 0 or s0 + n - 1 > limits.max_seed:
        last = f" (the last of the {n} seeds is {s0 + n - 1})" if n > 1 else ""
        raise InputError(f"seed must be between 0 and {limits.max_seed}, got {s0}{last}")
    sc = _as_float(scale, "LoRA scale")
    if not limits.min_scale <= sc <= limits.max_scale:
        raise InputError(
            f"LoRA scale must be between {limits.min_scale:g} and {limits.max_scale:g}, got {sc:g}"
        )
    return Request(prompt, negative or None, tuple(range(s0, s0 + n)), steps_i, g, sc)


# ---------------------------------------------------------------------------------------------------------------
# Allowed roots and model paths


def default_roots(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The folders model paths may point into, resolved: ``demo/assets``, the sandbox assets, ``outputs/``, the
    entries of ``$DIFFALIGN_DEMO_ROOTS`` (``os.pathsep``-separated) and ``extra`` (``--allow-root``)."""
    roots = [DEMO_DIR / "assets", ASSETS_DIR, REPO_ROOT / "outputs"]
    roots += [Path(p) for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    roots += [Path(p) for p in extra]
    out: list[Path] = []
    for r in roots:
        rr = Path(os.path.expanduser(str(r))).resolve()
        if rr not in out:
            out.append(rr)
    return out


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a resolved local path inside an allowed root, or a hub id (``hub=True``)."""

    location: str
    hub: bool = False


def check_model_path(text: str, roots: Sequence[Path], allow_hub: bool = False) -> ModelRef:
    """Turn what was typed into a :class:`ModelRef`, or raise :class:`ModelPathError`.

    ``"sandbox"`` names the shipped sandbox pipeline. A local path (relative ones are taken from the current
    directory) is resolved and must lie inside one of ``roots``; the check happens *before* anything is opened, so
    nothing outside the roots is read or probed. An ``org/name`` that is not inside a root is a hub id, accepted
    only when ``allow_hub``.
    """
    text = (text or "").strip()
    if not text:
        raise ModelPathError("the model path is empty")
    if text == "sandbox":
        text = str(SANDBOX_PIPELINE)
    if "\x00" in text:
        raise ModelPathError("the model path contains a NUL character")
    resolved = Path(os.path.expanduser(text)).resolve()
    if any(resolved == r or resolved.is_relative_to(r) for r in roots):
        return ModelRef(str(resolved))
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        if allow_hub:
            return ModelRef(text, hub=True)
        raise ModelPathError(
            f"{text!r} looks like a hub id, but hub models are off; start the app with --allow-hub (the machine "
            "also needs the model in its Hugging Face cache or network access)"
        )
    listed = ", ".join(str(r) for r in roots)
    raise ModelPathError(
        f"{text!r} is outside the folders this demo may read models from ({listed}); "
        "start the app with --allow-root DIR (or set $" + ROOTS_ENV + ") to add a folder"
    )


@dataclass(frozen=True)
class AlignedSpec:
    """What an aligned-model directory holds (see the module docstring for the kinds)."""

    kind: str  # "lora" | "pipeline" | "unet" | "unet_state"
    path: str  # the directory (lora, pipeline, unet) or file (unet_state) to load
    note: str = ""


def _detect(d: Path) -> AlignedSpec | None:
    if (d / LORA_FILE).is_file():
        return AlignedSpec("lora", str(d))
    if (d / "lora" / LORA_FILE).is_file():
        return AlignedSpec("lora", str(d / "lora"))
    if (d / "model_index.json").is_file():
        return AlignedSpec("pipeline", str(d))
    if (d / "config.json").is_file() and any(d.glob("diffusion_pytorch_model*.safetensors")):
        return AlignedSpec("unet", str(d))
    if (d / "unet" / "config.json").is_file():
        return AlignedSpec("unet", str(d / "unet"))
    if (d / "model.safetensors").is_file() and (d / "train_state.json").is_file():
        return AlignedSpec("unet_state", str(d / "model.safetensors"))
    return None


def resolve_aligned(ref: ModelRef) -> AlignedSpec:
    """Find the aligned model in a directory (kinds in the module docstring); a hub id is taken as a LoRA repo.

    Raises:
        FileNotFoundError: the directory does not exist ("no aligned model found at …").
        ModelPathError: it exists but holds none of the known layouts (the message lists them).
    """
    if ref.hub:
        return AlignedSpec("lora", ref.location, "hub LoRA")
    d = Path(ref.location)
    if not d.is_dir():
        raise FileNotFoundError(f"no aligned model found at {d}")
    spec = _detect(d)
    if spec is not None:
        return spec
    ckpts = sorted(
        (int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.match(p.name)) is not None
    )
    for step, p in reversed(ckpts):
        spec = _detect(p)
        if spec is not None:
            return AlignedSpec(spec.kind, spec.path, f"newest usable checkpoint: {p.name} (step {step})")
    raise ModelPathError(
        f"{d} holds no model the demo can load: expected {LORA_FILE} (LoRA), lora/{LORA_FILE} (training run), "
        "model_index.json (pipeline), config.json + diffusion_pytorch_model.safetensors or unet/ (UNet), "
        "model.safetensors + train_state.json (full fine-tuning checkpoint), or checkpoint-N/ folders with one "
        "of these"
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading and caching


@dataclass
class ModelPair:
    """A loaded base/aligned pair.

    ``kind == "lora"``: one pipeline, adapter ``"aligned"``; the base is the same pipeline with adapters disabled.
    ``kind in ("pipeline", "unet", "unet_state")``: ``aligned_pipe`` shares every component of ``base_pipe`` except
    its UNet, whose weights are ``lerp(base, aligned, scale)``. A pristine copy of the aligned weights is made the
    first time ``scale != 1`` (memory: two UNets, three while interpolating).
    ``kind == "none"``: no aligned model; both sides are the base (``notice`` says why).
    """

    base_pipe: object
    aligned_pipe: object
    kind: str
    base_label: str
    aligned_label: str
    notice: str = ""
    _scale: float = 1.0
    _aligned_state: dict | None = field(default=None, repr=False)

    def set_scale(self, scale: float) -> None:
        """Move the aligned side to ``scale`` (0 = base, 1 = aligned; see the module docstring)."""
        if self.kind == "lora":
            self.aligned_pipe.set_adapters(["aligned"], adapter_weights=[float(scale)])
        elif self.kind in ("pipeline", "unet", "unet_state") and scale != self._scale:
            live = self.aligned_pipe.unet.state_dict()  # tensors share storage with the parameters
            if self._aligned_state is None:
                self._aligned_state = {k: v.detach().clone() for k, v in live.items()}
            base_state = self.base_pipe.unet.state_dict()
            with torch.no_grad():
                for name, p in live.items():
                    if p.is_floating_point():
                        p.copy_(torch.lerp(base_state[name], self._aligned_state[name], float(scale)))
        self._scale = float(scale)


def missing_pipeline(ref: ModelRef) -> str | None:
    """Why ``ref`` is not a local pipeline directory (``None`` when it is one, or a hub id)."""
    if ref.hub or (Path(ref.location) / "model_index.json").is_file():
        return None
    if ref.location == str(SANDBOX_PIPELINE.resolve()):
        return (
            f"the sandbox pipeline is not built yet at {ref.location}; build it with "
            "`python scripts/build_sandbox.py`"
        )
    return f"no diffusers pipeline at {ref.location} (model_index.json is missing)"


def _load_pipeline(ref: ModelRef, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    kwargs = {"dtype": dtype}
    if ref.hub:
        kwargs["safety_checker"] = None
    elif (why := missing_pipeline(ref)) is not None:
        raise ModelPathError(why)
    pipe = DiffusionPipeline.from_pretrained(ref.location, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pair(
    base: ModelRef, aligned: ModelRef | None, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ModelPair:
    """Load the base pipeline and attach the aligned model (kinds in the module docstring).

    A missing aligned directory is not an error: the pair becomes base vs base with a ``notice``.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    base_label = "sandbox" if base.location == str(SANDBOX_PIPELINE.resolve()) else base.location
    notice = "no aligned model given; showing base vs base"
    spec = None
    if aligned is not None:
        try:
            spec = resolve_aligned(aligned)
        except FileNotFoundError as err:
            notice = f"{err}; showing base vs base"
    pipe = _load_pipeline(base, device, dtype)
    if spec is None:
        return ModelPair(pipe, pipe, "none", base_label, "base (no aligned model)", notice)
    label = f"{spec.kind}: {spec.path}" + (f" ({spec.note})" if spec.note else "")
    if spec.kind == "lora":
        pipe.load_lora_weights(spec.path, adapter_name="aligned")
        pair = ModelPair(pipe, pipe, "lora", base_label, label)
        pair.set_scale(1.0)
        return pair
    if spec.kind == "pipeline":
        unet = UNet2DConditionModel.from_pretrained(spec.path, subfolder="unet", dtype=dtype)
    elif spec.kind == "unet":
        unet = UNet2DConditionModel.from_pretrained(spec.path, dtype=dtype)
    else:  # unet_state: the base architecture with the checkpoint's weights
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        missing, unexpected = unet.load_state_dict(load_file(spec.path), strict=False)
        if missing or unexpected:
            raise ModelPathError(
                f"{spec.path} does not match the base UNet: {len(missing)} missing and {len(unexpected)} "
                f"unexpected keys (e.g. {(missing or unexpected)[:3]}); was it trained from this base model?"
            )
        unet = unet.to(dtype)
    base_sd = pipe.unet.state_dict()
    aligned_sd = unet.state_dict()
    if base_sd.keys() != aligned_sd.keys() or any(base_sd[k].shape != aligned_sd[k].shape for k in base_sd):
        raise ModelPathError(
            f"the aligned UNet at {spec.path} has a different architecture from the base model"
        )
    unet = unet.to(device)
    aligned_pipe = pipe.__class__(**{**pipe.components, "unet": unet})
    aligned_pipe.set_progress_bar_config(disable=True)
    return ModelPair(pipe, aligned_pipe, spec.kind, base_label, label)


class ModelCache:
    """Loaded pairs keyed by (base, aligned), least recently used first out (``capacity`` pairs kept)."""

    def __init__(self, capacity: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._pairs: OrderedDict[tuple, ModelPair] = OrderedDict()
        self.loads = 0  # how many times a pair was actually loaded (for tests and the status line)

    def get(self, base: ModelRef, aligned: ModelRef | None) -> ModelPair:
        key = (base, aligned)
        cached = self._pairs.get(key)
        # A pair loaded before its aligned model existed (base vs base) is reloaded once the folder appears.
        stale = (
            cached is not None
            and cached.kind == "none"
            and aligned is not None
            and not aligned.hub
            and Path(aligned.location).is_dir()
        )
        if cached is not None and not stale:
            self._pairs.move_to_end(key)
            return cached
        pair = load_pair(base, aligned, device=self.device, dtype=self.dtype)
        self.loads += 1
        self._pairs[key] = pair
        while len(self._pairs) > self.capacity:
            self._pairs.popitem(last=False)
        return pair


# ---------------------------------------------------------------------------------------------------------------
# Generation


def generate_both(
    pair: ModelPair, req: Request, *, height: int | None = None, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Base and aligned images for every seed of ``req``, the same seed on both sides.

    Returns ``(base, aligned)``, each ``[len(req.seeds), H, W, 3]`` uint8. Row ``i`` of both starts from the same
    initial noise (``torch.Generator().manual_seed(seeds[i])``, :func:`diffalign.eval.compare.generate`).
    """
    prompts = [req.prompt] * len(req.seeds)
    kw = dict(
        steps=req.steps,
        guidance=req.guidance,
        negative_prompt=req.negative_prompt,
        height=height,
        width=width if width is not None else height,
    )
    pair.set_scale(req.scale)
    if pair.kind == "lora":
        with adapters_disabled(pair.base_pipe):
            base = generate(pair.base_pipe, prompts, list(req.seeds), desc="base", **kw)
    else:
        base = generate(pair.base_pipe, prompts, list(req.seeds), desc="base", **kw)
    if pair.kind == "none":
        return base, base.copy()
    aligned = generate(pair.aligned_pipe, prompts, list(req.seeds), desc="aligned", **kw)
    return base, aligned


def enlarge(images: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor so small images (32 × 32) are visible: ``[N, H, W, 3]`` →
    ``[N, kH, kW, 3]`` with ``k = max(1, ceil(min_side / min(H, W)))``; every pixel becomes a ``k × k`` block."""
    k = max(1, -(-min_side // min(images.shape[1], images.shape[2])))
    return images.repeat(k, axis=1).repeat(k, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """``values[key]`` is ``[N]`` float64 (key order = display order); ``note`` explains when there are none."""

    values: dict[str, np.ndarray]
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.values)


class Scorer:
    """Catalog rewards, loaded once each, scoring ``(images, prompts)`` into :class:`Scores`."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._rewards: dict[str, object] = {}
        self._lock = threading.Lock()

    def reward(self, name: str):
        from diffalign.rewards.catalog import load_reward

        with self._lock:
            if name not in self._rewards:
                self._rewards[name] = load_reward(name, device=self.device)
            return self._rewards[name]

    def score(self, name: str, images: np.ndarray, prompts: list[str]) -> Scores:
        """Score ``[N, H, W, 3]`` uint8 images. Never raises for prompts or images the reward cannot handle: the
        note then says why (e.g. the sandbox judge only reads captions of the sandbox grammar)."""
        from diffalign.rewards.catalog import MissingWeightsError

        if name == "sandbox-judge":
            from diffalign.sandbox.captions import parse_caption

            try:
                for p in set(prompts):
                    parse_caption(p)
            except ValueError as err:
                return Scores({}, f"reward 'sandbox-judge' cannot score this prompt: {err}")
        try:
            reward = self.reward(name)
        except (MissingWeightsError, FileNotFoundError, ValueError) as err:
            return Scores({}, f"reward {name!r} is not available: {err}")
        try:
            raw = reward.score_aspects(images, prompts)
        except ValueError as err:
            return Scores({}, f"reward {name!r} cannot score this prompt or these images: {err}")
        values = {k: v.detach().double().cpu().numpy() for k, v in raw.items()}
        keys = [k for k in JUDGE_KEYS if k in values] if name == "sandbox-judge" else list(values)
        return Scores({k: values[k] for k in keys})


def format_scores(scores: Scores, index: int = 0) -> str:
    """Markdown lines ``**overall** 0.812`` for image ``index`` (or the note)."""
    if not scores.ok:
        return f"⚠️ {scores.note}"
    return "  \n".join(f"**{k}** {scores.values[k][index]:.3f}" for k in scores.values)


# ---------------------------------------------------------------------------------------------------------------
# Gallery tally


@dataclass
class Tally:
    """Per-seed outcome of aligned vs base under one score key, and the :func:`paired_win_rate` summary."""

    key: str
    outcomes: list[str]  # "win" | "tie" | "loss", one per seed, from the aligned model's side
    stats: dict

    def line(self) -> str:
        s = self.stats
        return (
            f"Aligned vs base on **{self.key}** over {s['n']} seed(s): **{s['wins']} win / {s['ties']} tie / "
            f"{s['losses']} loss** · win rate {s['win_rate']:.2f} (95% CI {s['ci_low']:.2f}–{s['ci_high']:.2f}, "
            f"sign test p = {s['p_value']:.3f}) · mean difference {s['mean_diff']:+.4f}"
        )


def tally(base: Scores, aligned: Scores, key: str, tie_tol: float = 1e-6) -> Tally:
    """Per-seed win/tie/loss of ``aligned[key] − base[key]`` (tie when ``|d| <= tie_tol``) and the win rate."""
    if key not in base.values or key not in aligned.values:
        raise KeyError(f"score {key!r} is not among the reward's outputs {list(base.values)}")
    a, b = aligned.values[key], base.values[key]
    d = a - b
    outcomes = ["win" if x > tie_tol else "loss" if x < -tie_tol else "tie" for x in d]
    return Tally(key, outcomes, paired_win_rate(a, b, tie_tol=tie_tol))


# ---------------------------------------------------------------------------------------------------------------
# The engine the page calls


@dataclass
class DemoConfig:
    """Everything the command line sets (``demo/app.py --help``)."""

    base: str = "sandbox"
    aligned: str = str(DEFAULT_ALIGNED)
    roots: list[Path] = field(default_factory=default_roots)
    allow_hub: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    resolution: int | None = None  # None: the pipeline's own size
    limits: Limits = Limits()
    cache_size: int = 2


@dataclass
class Comparison:
    """One click's result: the request, both image sets ``[N, H, W, 3]``, their scores and the model notice."""

    request: Request
    base: np.ndarray
    aligned: np.ndarray
    base_scores: Scores
    aligned_scores: Scores
    pair: ModelPair


class DemoEngine:
    """Validate → resolve paths → load (cached) → generate with shared seeds → score. One generation at a time."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.cache = ModelCache(config.cache_size, config.device, config.dtype)
        self.scorer = Scorer(config.device)
        self._lock = threading.Lock()

    def refs(self, base: str, aligned: str) -> tuple[ModelRef, ModelRef | None]:
        """Check both model fields (raises :class:`ModelPathError`); an empty aligned field means none."""
        cfg = self.config
        b = check_model_path(base, cfg.roots, cfg.allow_hub)
        a = check_model_path(aligned, cfg.roots, cfg.allow_hub) if (aligned or "").strip() else None
        return b, a

    def describe(self, base: str, aligned: str) -> str:
        """A status line for the page, without loading weights: what would be compared, or why not."""
        try:
            b, a = self.refs(base, aligned)
        except ModelPathError as err:
            return f"⚠️ {err}"
        if (why := missing_pipeline(b)) is not None:
            return f"⚠️ {why}"
        if a is None:
            return "ℹ️ no aligned model given; showing base vs base"
        try:
            spec = resolve_aligned(a)
        except FileNotFoundError as err:
            return f"ℹ️ {err}; showing base vs base"
        except ModelPathError as err:
            return f"⚠️ {err}"
        note = f" ({spec.note})" if spec.note else ""
        return f"base: `{b.location}` · aligned ({spec.kind}): `{spec.path}`{note}"

    def run(self, base: str, aligned: str, req: Request, reward: str) -> Comparison:
        """Raises :class:`ModelPathError` / ``OSError`` / ``RuntimeError`` for models that cannot be loaded."""
        b, a = self.refs(base, aligned)
        with self._lock:  # pipelines are mutated (adapter scale, lerped weights): one generation at a time
            pair = self.cache.get(b, a)
            base_imgs, aligned_imgs = generate_both(pair, req, height=self.config.resolution)
        prompts = [req.prompt] * len(req.seeds)
        return Comparison(
            req,
            base_imgs,
            aligned_imgs,
            self.scorer.score(reward, base_imgs, prompts),
            self.scorer.score(reward, aligned_imgs, prompts),
            pair,
        )

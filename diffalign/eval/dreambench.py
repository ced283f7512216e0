"""DreamBench (Ruiz et al. 2023, DreamBooth): subject-driven generation, its prompts and its metrics.

Data layout (the original ``google/dreambooth`` repository)::

    dataset/<subject>/*.jpg                 real images of each subject (30 subjects, 158 images in the full set)
    dataset/prompts_and_classes.txt         "Classes" (a ``subject_name,class`` table) and "Prompts": an
                                            "Object Prompts" and a "Live Subject Prompts" list of 25 templates
                                            each, written as Python ``'a {0} {1} in the jungle'.format(unique_token,
                                            class_token)`` lines

Protocol
--------
- Each subject's prompts are its list's 25 templates formatted with a **unique token** (``{0}``, default ``sks``) and
  the subject's **class** (``{1}``) from the table. Live subjects use the live-subject list; DreamBooth's live
  subjects are the cats and dogs, so a subject is *live* when its class is in ``LIVE_CLASSES`` (``cat``, ``dog``:
  9 of the 30 subjects); everything else is an object.
- 4 images per prompt (seeds ``seed .. seed + 3``, the same for every prompt and model).
- **DINO**: cosine between the ViT-S/16 DINO embeddings (CLS token of the last layer, after its layer norm; hub id
  ``facebook/dino-vits16``) of a generated and a real image, averaged over **all (generated, real) pairs** of the
  subject. **CLIP-I**: the same with CLIP image embeddings. **CLIP-T**: cosine between the CLIP image embedding of a
  generated image and the CLIP text embedding of its prompt, averaged over the images.
- CLIP-T's prompt: DreamBooth computes it against the prompt with the subject's **class** ("a dog in the jungle");
  the unique token is a rare token that carries no meaning for an off-the-shelf CLIP text encoder. The default here,
  ``clip_t_prompt="class"``, removes the unique token and keeps the class; ``"full"`` keeps the prompt as generated.
- **λ-Harmonic** (RPO, arXiv 2407.12164): per generated image ``s_img = (CLIP-I_i + 1) / 2`` (its mean CLIP cosine to
  the real images), ``s_txt = (CLIP-T_i + 1) / 2``, ``r_i = 1 / (λ / s_img + (1 − λ) / s_txt)``
  (:func:`diffalign.rewards.lambda_harmonic`), averaged over the images; λ = 0.5 by default.
- Per subject the mean over its images; overall the mean over subjects (every subject has the same number of
  images, so this is also the mean over all images), with the live and object subjects also averaged separately.

Backbones come from the reward catalog (``reward_models/*.yaml``) or a directory: DINO from an ``image_features``
manifest (``dino-vits16``) or any transformers vision model directory (:class:`ImageFeatureExtractor`); CLIP from
any CLIP manifest (``clip-vit-l14``, ``pickscore``'s backbone, ``sandbox-clip``) or a transformers CLIP directory.
On the sandbox there are no real weights: CLIP-I/CLIP-T use the tiny sandbox CLIP, and DINO is **stood in for** by
the tiny CLIP's vision tower CLS embedding before projection (manifest ``sandbox-dino-standin``); the outputs say so.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..config import _help
from ..errors import ConfigError
from ..rewards.combine import lambda_harmonic
from ..rewards.features import ImageFeatureExtractor  # also importable from here, as before
from .benchmark_models import SamplingConfig, apply_variant, load_base_pipeline, resolve_variant
from .compare import expand_prompts, generate
from .report import image_grid, markdown_table
from .stats import mean_ci

LIVE_CLASSES = ("cat", "dog")
PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_TEMPLATE = re.compile(r"""'([^']*\{[01]\}[^']*)'|"([^"]*\{[01]\}[^"]*)\"""")
_CLASS_ROW = re.compile(r"^([A-Za-z0-9_\-]+)\s*,\s*(.+?)\s*$")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DreamBenchPrompts:
    """The parsed ``prompts_and_classes.txt``: subject → class, and the object / live-subject templates."""

    classes: dict[str, str]
    object_templates: list[str]
    live_templates: list[str]
    path: Path | None = None


def parse_prompts_and_classes(path: str | Path) -> DreamBenchPrompts:
    """Parse DreamBench's ``prompts_and_classes.txt``.

    Robust to spacing and quoting: the class table is every ``name,class`` line after a line ``Classes`` (the
    ``subject_name,class`` header is skipped) until the prompts part; a template is any quoted string holding
    ``{0}`` or ``{1}``, assigned to the object list after a line mentioning "object" and to the live list after one
    mentioning "live".

    Raises:
        FileNotFoundError: no such file.
        ConfigError (a ValueError): no class table, or a template list is missing (names the file and what was
            found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DreamBench prompt file {path} not found (expected dataset/{PROMPTS_FILE})")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section, current = None, None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low == "classes":
            section = "classes"
            continue
        if low.startswith("prompts") and "=" not in low:
            section = "prompts"
            continue
        if section == "prompts" or "{0}" in line or "{1}" in line:
            section = "prompts"
            if "prompt" in low and "live" in low and not _TEMPLATE.search(line):
                current = "live"
                continue
            if "prompt" in low and "object" in low and not _TEMPLATE.search(line):
                current = "object"
                continue
            m = _TEMPLATE.search(line)
            if m:
                if current is None:
                    raise ConfigError(
                        f"{path}: template {line!r} appears before an 'Object'/'Live' prompt header"
                    )
                lists[current].append(m.group(1) if m.group(1) is not None else m.group(2))
            continue
        if section == "classes":
            m = _CLASS_ROW.match(line)
            if m and (m.group(1).lower(), m.group(2).lower()) != ("subject_name", "class"):
                classes[m.group(1)] = m.group(2)
    if not classes:
        raise ConfigError(f"{path}: no 'subject_name,class' rows found after a 'Classes' line")
    for kind, items in lists.items():
        if not items:
            raise ConfigError(
                f"{path}: no {kind} prompt templates found (expected quoted strings with {{0}} {{1}} after a line "
                f"'{'Object' if kind == 'object' else 'Live Subject'} Prompts')"
            )
    return DreamBenchPrompts(classes, lists["object"], lists["live"], path)


@dataclass
class Subject:
    """One DreamBench subject: its folder name, class word, live or object, and its real images."""

    name: str
    class_word: str
    live: bool
    images: list[Path]


@dataclass
class DreamBenchData:
    """A DreamBench directory: prompts, the subjects with images, and what could not be used."""

    root: Path
    prompts: DreamBenchPrompts
    subjects: list[Subject]
    missing: list[str] = field(default_factory=list)  # in the class table, no image folder
    unknown: list[str] = field(default_factory=list)  # image folder without a class in the table


def dataset_dir(root: str | Path) -> Path:
    """The folder holding ``prompts_and_classes.txt``: ``root`` itself or ``root/dataset``."""
    root = Path(root)
    for d in (root, root / "dataset"):
        if (d / PROMPTS_FILE).is_file():
            return d
    raise FileNotFoundError(
        f"{root} is not a DreamBench directory: no {PROMPTS_FILE} in it or in {root / 'dataset'} (expected the "
        "google/dreambooth layout dataset/<subject>/*.jpg + dataset/prompts_and_classes.txt)"
    )


def load_dreambench(
    root: str | Path, subjects: Sequence[str] | None = None, live_classes: Sequence[str] = LIVE_CLASSES
) -> DreamBenchData:
    """Read a DreamBench directory. Every sub-folder with images is a subject; its class comes from the table.

    Folders whose name is not in the table are listed in ``unknown`` (skipped); table rows without a folder in
    ``missing`` (a partial copy such as dreambench-mini). ``subjects`` restricts to these names (an unknown name
    raises ``ValueError`` listing the available ones).
    """
    d = dataset_dir(root)
    spec = parse_prompts_and_classes(d / PROMPTS_FILE)
    folders = {
        p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for p in sorted(d.iterdir())
        if p.is_dir()
    }
    folders = {k: v for k, v in folders.items() if v}
    if subjects:
        bad = [s for s in subjects if s not in folders]
        if bad:
            raise ConfigError(f"subject(s) {bad} have no image folder in {d}; available: {sorted(folders)}")
        folders = {k: folders[k] for k in subjects}
    live = {c.lower() for c in live_classes}
    out, unknown = [], []
    for name, images in folders.items():
        if name not in spec.classes:
            unknown.append(name)
            continue
        cls = spec.classes[name]
        out.append(Subject(name, cls, cls.lower() in live, images))
    missing = [] if subjects else [s for s in spec.classes if s not in folders]
    if not out:
        raise ConfigError(
            f"{d}: no subject folder with images matches the class table (folders: {sorted(folders)})"
        )
    return DreamBenchData(d, spec, out, missing, unknown)


def subject_prompts(subject: Subject, spec: DreamBenchPrompts, unique_token: str = "sks") -> list[str]:
    """The subject's prompts: each template of its list (live or object) formatted ``(unique_token, class)``."""
    templates = spec.live_templates if subject.live else spec.object_templates
    return [t.format(unique_token, subject.class_word) for t in templates]


def remove_token(prompt: str, unique_token: str) -> str:
    """The prompt without the unique token (whole word), spaces collapsed: 'a sks dog' → 'a dog'."""
    if not unique_token:
        return prompt
    return " ".join(w for w in prompt.split() if w != unique_token)


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """RGB PIL images (EXIF orientation applied, as a viewer shows them)."""
    from PIL import ImageOps

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(ImageOps.exif_transpose(im).convert("RGB"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics (pure maths on embeddings)


def l2_normalise(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm (float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_cosine_to_references(generated: Tensor, references: Tensor) -> Tensor:
    """``[N, D]`` generated and ``[R, D]`` real embeddings → ``[N]``: each generated image's mean cosine over the real
    images, ``(1/R) Σ_r cos(g_i, x_r)``. Its mean over ``i`` is the mean over all ``N · R`` pairs (DINO, CLIP-I)."""
    return (l2_normalise(generated) @ l2_normalise(references).T).mean(dim=1)


def paired_cosine(images: Tensor, texts: Tensor) -> Tensor:
    """Row-wise cosine ``cos(u_i, v_i)`` of ``[N, D]`` image and text embeddings → ``[N]`` (CLIP-T)."""
    return (l2_normalise(images) * l2_normalise(texts)).sum(dim=-1)


def subject_metrics(
    dino_gen: Tensor,
    dino_ref: Tensor,
    clip_gen: Tensor,
    clip_ref: Tensor,
    clip_txt: Tensor,
    lam: float = 0.5,
) -> dict[str, Tensor]:
    """Per generated image ``[N]``: ``dino``, ``clip_i``, ``clip_t`` (cosines) and ``harmonic`` (λ-Harmonic of the
    CLIP-I and CLIP-T cosines, RPO)."""
    clip_i = mean_cosine_to_references(clip_gen, clip_ref)
    clip_t = paired_cosine(clip_gen, clip_txt)
    return {
        "dino": mean_cosine_to_references(dino_gen, dino_ref),
        "clip_i": clip_i,
        "clip_t": clip_t,
        "harmonic": lambda_harmonic(clip_i, clip_t, lam),
    }


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def load_feature_backbone(name_or_dir: str, device: str = "cpu") -> ImageFeatureExtractor:
    """DINO backbone: a catalog name / manifest of kind ``image_features``, or a vision model directory."""
    p = Path(name_or_dir)
    if p.is_dir():
        return ImageFeatureExtractor.from_pretrained(p, device=device)
    from ..rewards.catalog import load_reward

    backbone = load_reward(name_or_dir, device=device)
    if not isinstance(backbone, ImageFeatureExtractor):
        raise ConfigError(
            f"{name_or_dir!r} is not an image-feature backbone (kind image_features, e.g. dino-vits16; or give a model "
            "directory, e.g. reward_models/sandbox-clip for its vision tower); got "
            f"{type(backbone).__name__}"
        )
    return backbone


class ClipEmbedder:
    """CLIP image and text embeddings (projected, not normalised) through a catalog CLIP reward's own
    preprocessing (``OpenClipReward`` or ``HFClipReward``: ``pixel_values``, ``image_features``, ``text_features``)."""

    def __init__(self, clip, batch_size: int = 32) -> None:
        for attr in ("pixel_values", "image_features", "text_features"):
            if not hasattr(clip, attr):
                raise ConfigError(
                    f"{getattr(clip, 'name', clip)!r} is not a CLIP model (no {attr}); use a CLIP manifest such as "
                    "clip-vit-l14 or sandbox-clip"
                )
        self.clip = clip
        self.name = clip.name
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_dir: str, device: str = "cpu") -> ClipEmbedder:
        """A catalog name / manifest path, or a transformers CLIP directory."""
        p = Path(name_or_dir)
        if p.is_dir():
            from ..rewards.hf_clip import HFClipReward

            return cls(HFClipReward.from_pretrained(p, name=p.name, score="cosine", device=device))
        from ..rewards.catalog import load_reward

        return cls(load_reward(name_or_dir, device=device))

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image] | np.ndarray) -> Tensor:
        if isinstance(images, np.ndarray):
            images = [Image.fromarray(a) for a in images]
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = list(images[i : i + self.batch_size])
            out.append(self.clip.image_features(self.clip.pixel_values(batch)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out.append(self.clip.text_features(list(prompts[i : i + self.batch_size])).float().cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class DreamBenchConfig(SamplingConfig):
    """Settings of :func:`run_dreambench` (the script's flags have the same names)."""

    data: str = _help(
        "DreamBench directory (holding dataset/ or prompts_and_classes.txt itself); 'sandbox' = the shipped sandbox "
        "subjects (the default, so the script runs with no arguments)",
        "sandbox",
    )
    subjects: list[str] | None = _help(
        "comma-separated subject names (default: every subject with images)", None
    )
    base: str = _help("base model: 'sandbox' or a diffusers pipeline directory", "sandbox")
    subject_models: str | None = _help(
        "directory with one model per subject (DIR/<subject>: LoRA, UNet, pipeline or run dir); subjects without "
        "one use the base",
        None,
    )
    unique_token: str = _help("the identifier token of the prompts ({0} in the templates)", "sks")
    images_per_prompt: int = _help("images per prompt (DreamBench: 4)", 4)
    seed: int = _help("first seed; every prompt uses seed .. seed + images_per_prompt - 1", 0)
    dino: str | None = _help(
        "DINO backbone: image_features manifest or vision model dir (default: dino-vits16; on the sandbox the "
        "stand-in sandbox-dino-standin)",
        None,
    )
    clip: str | None = _help(
        "CLIP backbone: CLIP manifest or transformers CLIP dir (default: clip-vit-l14; sandbox-clip on the sandbox)",
        None,
    )
    clip_t_prompt: str = _help(
        "CLIP-T text: 'class' (unique token removed, DreamBooth) or 'full' prompt", "class"
    )
    lam: float = _help("λ of the λ-Harmonic reward (RPO): weight of the image similarity", 0.5)
    live_classes: list[str] = _help("classes whose subjects use the live-subject prompts", list(LIVE_CLASSES))
    save_images: bool = _help("also write every generated image as PNG under images/<subject>/", False)
    output_dir: str = _help("where results.json, results.md and the grids go", "outputs/benchmark-dreambench")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError(
                "config field data is empty: give the DreamBench directory (--data PATH, with "
                "dataset/prompts_and_classes.txt) or 'sandbox'"
            )
        if self.clip_t_prompt not in ("class", "full"):
            raise ConfigError(
                f"config field clip_t_prompt must be 'class' or 'full', got {self.clip_t_prompt!r}"
            )
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"config field lam must be in [0, 1], got {self.lam}")
        if self.images_per_prompt < 1:
            raise ConfigError(f"config field images_per_prompt must be >= 1, got {self.images_per_prompt}")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images_per_prompt)]


METRICS = ("dino", "clip_i", "clip_t", "harmonic")
#: sandbox only: the judge's prompt-following on the prompt without the unique token (the context words and the
#: class), and the programmatic subject match of :func:`diffalign.sandbox.subjects.subject_similarity`
SANDBOX_METRICS = ("judge_context", "subject_match")
METRIC_LABELS = {"judge_context": "judge context", "subject_match": "subject match"}


def _square(img: Image.Image, side: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``side`` (for grids)."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((side, side), Image.Resampling.LANCZOS))


def subject_grid(references: list[Image.Image], generated: np.ndarray, images_per_prompt: int) -> Image.Image:
    """Real images on the first row(s), then the generated images, ``2 × images_per_prompt`` per row (two prompts
    per row, in prompt order); tiles at least 64 px (small images upscaled)."""
    side = generated.shape[1]
    ncols = 2 * images_per_prompt
    refs = np.stack([_square(r, side) for r in references])
    pad = (-len(refs)) % ncols  # white tiles so the generated images start on a new row
    blank = np.full((pad, side, side, 3), 255, dtype=np.uint8)
    scale = max(1, -(-64 // side))
    return image_grid(np.concatenate([refs, blank, generated]), ncols=ncols, scale=scale, pad=2)


def format_table(results: dict) -> str:
    """The papers' table: subject rows, then the means (overall, live, object)."""
    dino_label = "DINO*" if results["backbones"]["dino"]["stand_in_for"] else "DINO"
    lam = results["settings"]["lam"]
    metrics = results.get("metrics", list(METRICS))
    extra = [METRIC_LABELS[m] for m in metrics if m not in METRICS]
    header = ["subject", "class", "model", dino_label, "CLIP-I", "CLIP-T", f"λ-harmonic (λ={lam})", *extra]
    rows = [
        [name, s["class"] + (" (live)" if s["live"] else ""), s["model"], *(s[m] for m in metrics)]
        for name, s in results["subjects"].items()
    ]
    for key, label in (("mean", "**mean**"), ("mean_live", "mean (live)"), ("mean_object", "mean (object)")):
        if results.get(key):
            rows.append([label, f"n={results[key]['n_subjects']}", "", *(results[key][m] for m in metrics)])
    return markdown_table(header, rows)


def format_markdown(results: dict) -> str:
    b = results["backbones"]
    lines = [
        "# DreamBench-protocol benchmark",
        "",
        f"- data: `{results['data']}` ({len(results['subjects'])} subjects"
        + (
            f"; {len(results['missing_subjects'])} subjects of the class table have no images here"
            if results["missing_subjects"]
            else ""
        )
        + ")",
        f"- {results['num_prompts_per_subject']} prompts per subject (unique token `{results['settings']['unique_token']}`), "
        f"{results['settings']['images_per_prompt']} images per prompt, seeds {results['seeds']}",
        f"- DINO backbone: `{b['dino']['name']}`"
        + (
            f" — **stand-in** for {b['dino']['stand_in_for']}: {b['dino']['note']}"
            if b["dino"]["stand_in_for"]
            else ""
        ),
        f"- CLIP backbone: `{b['clip']['name']}`; CLIP-T text: {results['clip_t_text']}",
        "",
        format_table(results),
        "",
    ]
    if b["dino"]["stand_in_for"]:
        lines.append(
            f"\\* DINO column computed with the stand-in backbone `{b['dino']['name']}`, not {b['dino']['stand_in_for']}."
        )
    if results["unknown_subjects"]:
        lines.append(f"- skipped folders without a class in the table: {results['unknown_subjects']}")
    return "\n".join(lines) + "\n"


def _group_mean(subjects: dict, names: list[str], metrics: Sequence[str] = METRICS) -> dict | None:
    if not names:
        return None
    out: dict = {"n_subjects": len(names)}
    for m in metrics:
        vals = [subjects[n][m] for n in names]
        out[m] = float(np.mean(vals))
        if len(vals) >= 2:
            ci = mean_ci(vals)
            out[f"{m}_ci"] = [ci["ci_low"], ci["ci_high"]]
    return out


def resolve_dreambench_dir(data: str | Path) -> Path:
    """``"sandbox"`` → the shipped sandbox subjects (``diffalign/sandbox/assets/dreambench``); a path unchanged."""
    if str(data) == "sandbox":
        from ..sandbox import ASSETS_DIR

        return ASSETS_DIR / "dreambench"
    return Path(data)


def sandbox_metrics(images: np.ndarray, prompts: list[str], subject_name: str) -> dict[str, Tensor]:
    """Per image ``[N]``: ``judge_context`` (the sandbox judge's prompt-following on the prompt without the unique
    token) and, for a shipped sandbox subject, ``subject_match``."""
    from ..sandbox.judge import Judge
    from ..sandbox.subjects import SUBJECTS_BY_NAME, subject_similarity

    out = {"judge_context": torch.from_numpy(Judge().score(images, prompts)["prompt_following"]).float()}
    if subject_name in SUBJECTS_BY_NAME:
        out["subject_match"] = torch.from_numpy(
            subject_similarity(images, SUBJECTS_BY_NAME[subject_name])
        ).float()
    return out


def backbone_names(base: str, clip: str | None = None, dino: str | None = None) -> tuple[str, str]:
    """``(CLIP, DINO)`` of the DreamBench protocol: the given ones, else the sandbox's stand-ins for the sandbox base
    (``sandbox-clip``, ``sandbox-dino-standin``) and the paper's models otherwise (``clip-vit-l14``, ``dino-vits16``)."""
    sandbox = base == "sandbox"
    return (
        clip or ("sandbox-clip" if sandbox else "clip-vit-l14"),
        dino or ("sandbox-dino-standin" if sandbox else "dino-vits16"),
    )


def run_dreambench(cfg: DreamBenchConfig) -> dict:
    """Generate every subject's prompts with its model, compute DINO / CLIP-I / CLIP-T / λ-harmonic, write
    ``results.json``, ``results.md`` and ``grids/<subject>.png``; returns the results."""
    from .benchmark_pickapic import DTYPES, _json_safe, resolve_device

    t0 = time.time()
    out_dir = Path(cfg.output_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    data = load_dreambench(resolve_dreambench_dir(cfg.data), cfg.subjects, cfg.live_classes)
    print(
        f"DreamBench at {data.root}: {len(data.subjects)} subjects "
        f"({sum(s.live for s in data.subjects)} live, {sum(not s.live for s in data.subjects)} objects), "
        f"{sum(len(s.images) for s in data.subjects)} real images"
    )
    if data.missing:
        print(f"  {len(data.missing)} subjects of the class table have no image folder here (not evaluated)")
    if data.unknown:
        print(f"  skipped {len(data.unknown)} folder(s) without a class in the table: {data.unknown}")

    sandbox = cfg.base == "sandbox"
    clip_name, dino_name = backbone_names(cfg.base, cfg.clip, cfg.dino)
    dino = load_feature_backbone(dino_name, device)
    clip = ClipEmbedder.load(clip_name, device)
    dino_info = {
        "name": dino_name,
        "pooling": dino.pooling,
        "stand_in_for": dino.stand_in_for,
        "note": (
            "CLS embedding of the tiny sandbox CLIP's vision tower (before projection): it only plays DINO's role; "
            "its values are not comparable with DINO ViT-S/16 numbers"
            if dino.stand_in_for
            else ""
        ),
    }
    print(f"backbones: DINO {dino!r}; CLIP {clip.name}")

    pipe = load_base_pipeline(cfg.base, device, DTYPES[cfg.dtype])
    gen_kw = cfg.generate_kwargs()
    seeds = cfg.seeds
    subjects: dict[str, dict] = {}
    grids: dict[str, Path] = {}
    for subject in tqdm(data.subjects, desc="subjects"):
        prompts = subject_prompts(subject, data.prompts, cfg.unique_token)
        rows_p, rows_s = expand_prompts(prompts, seeds)
        model_dir = Path(cfg.subject_models) / subject.name if cfg.subject_models else None
        variant = resolve_variant(model_dir if model_dir is not None and model_dir.is_dir() else None)
        with apply_variant(pipe, variant) as p:
            images = generate(p, rows_p, rows_s, desc=f"{subject.name}", **gen_kw)
        refs = load_images(subject.images)
        text_rows = (
            rows_p if cfg.clip_t_prompt == "full" else [remove_token(x, cfg.unique_token) for x in rows_p]
        )
        m = subject_metrics(
            dino.embed(images),
            dino.embed(refs),
            clip.images(images),
            clip.images(refs),
            clip.texts(text_rows),
            cfg.lam,
        )
        if sandbox:
            m.update(
                sandbox_metrics(images, [remove_token(x, cfg.unique_token) for x in rows_p], subject.name)
            )
        per_prompt = {
            m_name: v.reshape(len(prompts), len(seeds)).mean(dim=1).tolist() for m_name, v in m.items()
        }
        subjects[subject.name] = {
            "class": subject.class_word,
            "live": subject.live,
            "model": variant.describe() if variant.kind != "base" else "base",
            "num_real_images": len(refs),
            "num_generated": int(len(images)),
            **{k: float(v.mean()) for k, v in m.items()},
            "prompts": prompts,
            "per_prompt": per_prompt,
            # every image, prompt-major (prompt i's seeds at i*S .. i*S + S - 1): paired comparisons between models
            "per_image": {m_name: [round(float(x), 6) for x in v.tolist()] for m_name, v in m.items()},
        }
        grids[subject.name] = out_dir / "grids" / f"{subject.name}.png"
        subject_grid(refs, images, len(seeds)).save(grids[subject.name])
        if cfg.save_images:
            d = out_dir / "images" / subject.name
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                Image.fromarray(img).save(d / f"p{i // len(seeds):02d}_s{rows_s[i]}.png")

    names = list(subjects)
    metrics = [k for k in (*METRICS, *SANDBOX_METRICS) if all(k in s for s in subjects.values())]
    results = {
        "metrics": metrics,
        "benchmark": "dreambench-protocol",
        "data": str(data.root),
        "settings": {**asdict(cfg), "device": device},
        "seeds": seeds,
        "num_prompts_per_subject": len(data.prompts.object_templates),
        "clip_t_text": "prompt with the unique token removed (class kept)"
        if cfg.clip_t_prompt == "class"
        else "the full prompt (with the unique token)",
        "backbones": {"dino": dino_info, "clip": {"name": clip_name}},
        "subjects": subjects,
        "mean": _group_mean(subjects, names, metrics),
        "mean_live": _group_mean(subjects, [n for n in names if subjects[n]["live"]], metrics),
        "mean_object": _group_mean(subjects, [n for n in names if not subjects[n]["live"]], metrics),
        "missing_subjects": data.missing,
        "unknown_subjects": data.unknown,
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    (out_dir / "results.md").write_text(format_markdown(results))
    from .plots import plot_dreambench

    plot = plot_dreambench(
        {n: subjects[n] for n in names}, ["dino", "clip_i", "clip_t", "harmonic"], out_dir / "metrics.png"
    )
    print(format_markdown(results))
    print(
        f"outputs:\n  results.json: {out_dir / 'results.json'}\n  results.md: {out_dir / 'results.md'}\n"
        f"  metrics plot: {plot}\n  grids: {out_dir / 'grids'} ({len(grids)} PNGs: real images first, then the "
        f"generated ones, {2 * len(seeds)} per row)"
    )
    return results


def compare_to_base(results: dict, base: dict, primary: str = "harmonic", tie_tol: float = 1e-6) -> dict:
    """The common ``eval.json`` shape for two DreamBench runs on the same prompts and seeds: the win rate of
    ``results`` over ``base`` per prompt (its seeds averaged; every subject's prompts pooled) on ``primary``
    (λ-Harmonic by default, RPO's trade-off of subject and text), with a Wilson 95% interval, and every metric's
    mean and 95% CI over the images on both sides."""
    from .stats import paired_win_rate

    if results["seeds"] != base["seeds"] or list(results["subjects"]) != list(base["subjects"]):
        raise ValueError("compare_to_base needs two runs over the same subjects and seeds")
    S = len(results["seeds"])
    a_all, b_all, aspects = [], [], {}
    for name, s in results["subjects"].items():
        b = base["subjects"][name]
        if s["prompts"] != b["prompts"]:
            raise ValueError(f"subject {name}: the two runs used different prompts")
        a_all.append(np.asarray(s["per_image"][primary]).reshape(-1, S).mean(axis=1))
        b_all.append(np.asarray(b["per_image"][primary]).reshape(-1, S).mean(axis=1))
    for m in results.get("metrics", METRICS):
        av = np.concatenate([np.asarray(s["per_image"][m]) for s in results["subjects"].values()])
        bv = np.concatenate([np.asarray(b["per_image"][m]) for b in base["subjects"].values()])
        aspects[m] = {"base": mean_ci(bv), "aligned": mean_ci(av)}
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    return {
        "protocol": "dreambench",
        "primary": primary,
        "lambda": results["settings"]["lam"],
        "num_prompts": int(len(a)),
        "num_images_per_side": int(len(a) * S),
        "seeds_per_prompt": S,
        "win_rate": paired_win_rate(a, b, tie_tol=tie_tol),
        "aspects": aspects,
        "subjects": list(results["subjects"]),
    }

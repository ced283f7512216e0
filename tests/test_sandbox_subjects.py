"""The sandbox's DreamBench subjects: two-tone scenes, the subjects and their prompts, subject_similarity, the
DreamBench files (and their shipped copy), and the judge on two-tone objects."""

from __future__ import annotations

import hashlib
import io
import itertools
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.eval.dreambench import load_dreambench, load_images, remove_token, subject_prompts
from diffalign.sandbox.captions import WorldConfig, parse_caption, sample_example
from diffalign.sandbox.judge import Judge, analyze
from diffalign.sandbox.scene import (
    BACKGROUNDS,
    OBJECT_COLORS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    Scene,
    outline_color,
    render,
)
from diffalign.sandbox.subjects import (
    EVAL_TEMPLATES,
    NUM_REFERENCES,
    REFERENCE_JITTER,
    SANDBOX_DREAMBENCH,
    SUBJECTS,
    TRAINING_TEMPLATES,
    VALIDATION_TEMPLATES,
    SandboxSubject,
    _distance_to_segment,
    encode_jpeg,
    get_subject,
    reference_images,
    reference_scenes,
    scene_prompt,
    subject_similarity,
    write_dreambench,
)

REPO = Path(__file__).resolve().parents[1]
JUDGE = Judge()


def _rgb(name: str) -> np.ndarray:
    return np.array(OBJECT_COLORS[name], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def _pinned_solid_scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    world = WorldConfig(p_hazard=0.3, p_noise=0.3, p_smear=0.3)
    scenes = [sample_example(rng, world)[0] for _ in range(40)]
    return scenes + [
        Scene("circle", "red", "large", "left", "sky"),
        Scene("cross", "blue", "small", "top", "black", outline=True),
        Scene(
            "triangle", "yellow", "large", "center", "sand", outline=True, hazard=True,
            hazard_corner="bottom_right", noise=0.1, smear=1, dx=0.3, dy=-0.7, scale=1.05, seed=7,
        ),
    ]  # fmt: skip


def test_solid_scenes_render_bit_identical_to_before_two_tone_patterns():
    # sha256 of these 43 renders computed with the renderer before Scene.color2 / Scene.pattern existed
    # (11 with an outline, 11 hazards, 13 noisy, 13 smeared)
    h = hashlib.sha256()
    for scene in _pinned_solid_scenes():
        assert scene.pattern == "solid" and scene.color2 is None
        h.update(render(scene).tobytes())
    assert h.hexdigest() == "cfec42dd05539daa0ee13244951c51a8640e7852a92a2ea7a134b43e492d8704"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(pattern="zigzag", color2="yellow"), "Scene.pattern"),
        (dict(pattern="split_h"), "Scene.color2"),
        (dict(pattern="split_h", color2="pink"), "Scene.color2"),
        (dict(pattern="split_h", color2="red"), "Scene.color2"),
        (dict(color2="yellow"), "Scene.color2"),  # a solid object has one colour
    ],
)
def test_two_tone_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Scene("circle", "red", "large", "center", "white", **kwargs)


def _near(img: np.ndarray, colour: str, tol: float = 12.0) -> np.ndarray:
    return np.linalg.norm(img.astype(np.float64) - _rgb(colour), axis=-1) < tol


@pytest.mark.parametrize("pattern", PATTERNS[1:])
def test_patterns_show_both_colours_and_move_with_the_object(pattern):
    centre = render(Scene("circle", "red", "large", "center", "white", color2="blue", pattern=pattern))
    assert _near(centre, "red").sum() >= 25 and _near(centre, "blue").sum() >= 20
    # the geometry is relative to the object: 8 px to the left, the same pixels 8 px to the left
    left = render(Scene("circle", "red", "large", "left", "white", color2="blue", pattern=pattern))
    np.testing.assert_array_equal(left[:, :24], centre[:, 8:])
    # and it scales with it: a small object still shows both colours (stripes of 1.6 px mix into one colour)
    small = render(Scene("square", "red", "small", "center", "white", color2="blue", pattern=pattern))
    if pattern != "stripes":
        assert _near(small, "red").sum() >= 3 and _near(small, "blue").sum() >= 3


def test_pattern_layouts():
    # a large square in the centre covers pixels 10..21 fully; its centre is at (16, 16)
    kw = dict(shape="square", size="large", position="center", background="white", color="red", color2="blue")
    img = render(Scene(pattern="split_h", **kw))  # top red, bottom blue
    assert _near(img[10:15, 10:22], "red").all() and _near(img[17:22, 10:22], "blue").all()
    img = render(Scene(pattern="split_v", **kw))  # left red, right blue
    assert _near(img[10:22, 10:15], "red").all() and _near(img[10:22, 17:22], "blue").all()
    img = render(Scene(pattern="checker", **kw))  # top-left and bottom-right red
    assert _near(img[10:15, 10:15], "red").all() and _near(img[17:22, 17:22], "red").all()
    assert _near(img[10:15, 17:22], "blue").all() and _near(img[17:22, 10:15], "blue").all()
    img = render(Scene(pattern="dot", **kw))  # a blue centre disc
    assert _near(img[15:17, 15:17], "blue").all() and _near(img[10:12, 10:12], "red").all()
    img = render(Scene(pattern="stripes", **kw))  # 3-px bands: the middle one red, then blue
    assert _near(img[15:17, 10:22], "red").all() and _near(img[18:20, 10:22], "blue").all()


def test_outlined_two_tone_scene_keeps_outline_and_both_colours():
    img = render(
        Scene("circle", "red", "large", "center", "black", outline=True, color2="yellow", pattern="split_h")
    )
    oc = np.array(outline_color("black"), dtype=np.float64)
    assert (np.linalg.norm(img.astype(float) - oc, axis=-1) < 12).sum() >= 20
    assert _near(img, "red").sum() >= 40 and _near(img, "yellow").sum() >= 40


# ---------------------------------------------------------------------------------------------------------------
# Subjects and their references


def test_subjects_are_fixed_two_tone_identities():
    assert len(SUBJECTS) >= 6
    names = [s.name for s in SUBJECTS]
    assert len(set(names)) == len(names)
    assert len({(s.class_word, s.pattern, s.color, s.color2) for s in SUBJECTS}) == len(SUBJECTS)
    assert len({s.class_word for s in SUBJECTS}) == len(SHAPES)  # every shape is some subject's class
    for s in SUBJECTS:
        assert s.class_word in SHAPES and s.pattern in PATTERNS and s.pattern != "solid"
        assert s.name.startswith(f"{s.color}{s.color2}_") and s.name.endswith(f"_{s.class_word}")
        assert get_subject(s.name) is s
        c1, c2 = _rgb(s.color), _rgb(s.color2)
        assert np.linalg.norm(c1 - c2) >= 160
        # every mix of the two colours stays far from every background/outline mix (the edge never vanishes)
        for bg, t in itertools.product(BACKGROUNDS, np.linspace(0, 1, 21)):
            seg = (np.array(BACKGROUNDS[bg], float), np.array(outline_color(bg), float))
            assert _distance_to_segment((1 - t) * c1 + t * c2, *seg) >= 50, (s.name, bg, t)
    with pytest.raises(ValueError, match="unknown sandbox subject"):
        get_subject("dog")
    with pytest.raises(ValueError, match=r"SandboxSubject\.pattern"):
        SandboxSubject("x", "circle", "solid", "red", "yellow")
    with pytest.raises(ValueError, match=r"SandboxSubject\.class_word"):
        SandboxSubject("x", "dog", "split_h", "red", "yellow")


def test_reference_scenes_vary_and_are_deterministic():
    for s in SUBJECTS:
        scenes = reference_scenes(s)
        assert len(scenes) == NUM_REFERENCES
        assert {sc.position for sc in scenes} == set(POSITIONS)
        assert {sc.background for sc in scenes} == set(BACKGROUNDS)
        for sc in scenes:
            assert (sc.shape, sc.color, sc.color2, sc.pattern) == (s.class_word, s.color, s.color2, s.pattern)
            assert sc.size == "large" and sc.scale == 1.0
            assert not (sc.outline or sc.hazard or sc.noise or sc.smear)
            assert max(abs(sc.dx), abs(sc.dy)) <= REFERENCE_JITTER
        assert reference_scenes(s) == scenes
        assert reference_scenes(s, seed=1) != scenes
    assert len(reference_scenes(SUBJECTS[0], n=7)) == 7


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates


def test_templates_are_dreambench_style_and_parse_in_the_grammar():
    assert 12 <= len(EVAL_TEMPLATES) <= 16
    assert len(TRAINING_TEMPLATES) == 8 and len(VALIDATION_TEMPLATES) == 2
    groups = (set(EVAL_TEMPLATES), set(TRAINING_TEMPLATES), set(VALIDATION_TEMPLATES))
    assert sum(map(len, groups)) == len(set().union(*groups))  # no template in two lists, none repeated
    assert len(set(EVAL_TEMPLATES)) == len(EVAL_TEMPLATES)
    named: dict[str, set] = {"position": set(), "background": set(), "size": set(), "outline": set()}
    for template in (*EVAL_TEMPLATES, *TRAINING_TEMPLATES, *VALIDATION_TEMPLATES):
        assert "{0} {1}" in template
        assert not any(c in template.split() for c in OBJECT_COLORS), template
        for s in SUBJECTS:
            prompt = template.format("sks", s.class_word)
            spec = parse_caption(remove_token(prompt, "sks"))
            assert spec.shape == s.class_word and spec.color is None
            if template in EVAL_TEMPLATES:
                for key in named:
                    if getattr(spec, key) is not None:
                        named[key].add(getattr(spec, key))
    # the evaluation prompts cover positions, backgrounds, sizes and the outline
    assert len(named["position"]) >= 4 and len(named["background"]) >= 4
    assert named["size"] == {"small", "large"} and named["outline"] == {True}
    assert any(t.startswith(("a picture of", "an icon of", "a drawing of")) for t in EVAL_TEMPLATES)


def test_scene_prompt_describes_the_scene():
    s = SUBJECTS[0]
    sc = reference_scenes(s)[0]
    prompt = scene_prompt(s, sc)
    assert prompt.startswith(f"a sks {s.class_word} ")
    spec = parse_caption(remove_token(prompt, "sks"))
    assert (spec.shape, spec.position, spec.background, spec.outline) == (
        s.class_word, sc.position, sc.background, None,
    )  # fmt: skip
    assert parse_caption(scene_prompt(s, sc.replace(outline=True), unique_token="")).outline is True


# ---------------------------------------------------------------------------------------------------------------
# subject_similarity


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
def test_similarity_high_for_the_subject_low_for_what_is_not(subject):
    scenes = reference_scenes(subject)
    refs = np.stack([render(sc) for sc in scenes])
    assert subject_similarity(refs, subject).min() >= 0.9
    assert subject_similarity(refs, subject.name).min() >= 0.9  # by name too
    # the subject with an outline, or small, is still the subject
    assert (
        subject_similarity(np.stack([render(sc.replace(outline=True)) for sc in scenes]), subject).min()
        >= 0.75
    )
    assert (
        subject_similarity(np.stack([render(sc.replace(size="small")) for sc in scenes]), subject).min()
        >= 0.85
    )

    def variants(**changes) -> np.ndarray:
        return subject_similarity(np.stack([render(sc.replace(**changes)) for sc in scenes]), subject)

    # a solid object of either colour (or any colour), the right shape and place
    for colour in OBJECT_COLORS:
        assert variants(pattern="solid", color2=None, color=colour).max() <= 0.5, colour
    # the right pattern in other colours: swapped, or another pair
    assert variants(color=subject.color2, color2=subject.color).max() <= 0.5
    others = [c for c in OBJECT_COLORS if c not in (subject.color, subject.color2)]
    assert variants(color=others[0], color2=others[1]).max() <= 0.5
    # the right colours in another layout
    for pattern in PATTERNS[1:]:
        if pattern != subject.pattern and {pattern, subject.pattern} != {"checker", "split_v"}:
            assert variants(pattern=pattern).max() <= 0.75, pattern


def test_similarity_of_empty_images_and_other_subjects():
    for bg in BACKGROUNDS.values():
        empty = np.broadcast_to(np.array(bg, dtype=np.uint8), (2, 32, 32, 3))
        assert (subject_similarity(empty, SUBJECTS[0]) == 0).all()
    assert subject_similarity(reference_images(SUBJECTS[0])[0], SUBJECTS[0]).shape == (1,)
    with pytest.raises(ValueError, match="subject_similarity expects"):
        subject_similarity(np.zeros((2, 16, 16, 3), np.uint8), SUBJECTS[0])
    # another subject's references are not this subject (the two red/yellow squares share half their layout)
    for a, b in itertools.permutations(SUBJECTS, 2):
        assert subject_similarity(reference_images(a), b).max() <= 0.6, (a.name, b.name)


def test_no_caption_of_the_grammar_draws_a_subject():
    # captions name one colour at most: whatever the world renders for them is never a subject
    rng = np.random.default_rng(0)
    world = WorldConfig(p_hazard=0.15, p_noise=0.15, p_smear=0.15, p_caption_noise=0.0)
    images = np.stack([render(sample_example(rng, world)[0]) for _ in range(100)])
    # and the closest a caption can come: each subject's class in one of its colours at its reference places
    close = [
        render(sc.replace(pattern="solid", color2=None, color=colour))
        for s in SUBJECTS
        for sc in reference_scenes(s)[:2]
        for colour in (s.color, s.color2)
    ]
    images = np.concatenate([images, np.stack(close)])
    for s in SUBJECTS:
        assert subject_similarity(images, s).max() < 0.5, s.name


# ---------------------------------------------------------------------------------------------------------------
# The DreamBench directory and its shipped copy


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dreambench_is_loaded_by_the_dreambench_loader(tmp_path):
    ddir = write_dreambench(tmp_path)
    assert ddir == tmp_path / "dataset" and (tmp_path / "README.md").is_file()
    data = load_dreambench(tmp_path)
    assert {s.name for s in data.subjects} == {s.name for s in SUBJECTS}
    assert data.missing == [] and data.unknown == []
    assert data.prompts.object_templates == list(EVAL_TEMPLATES)
    assert data.prompts.live_templates == list(EVAL_TEMPLATES)
    for loaded in data.subjects:
        subject = get_subject(loaded.name)
        assert loaded.class_word == subject.class_word and not loaded.live
        assert [p.name for p in loaded.images] == [f"{i:02d}.jpg" for i in range(NUM_REFERENCES)]
        prompts = subject_prompts(loaded, data.prompts)
        assert prompts[0] == EVAL_TEMPLATES[0].format("sks", subject.class_word)
        # the JPEGs keep the two-tone edge
        jpegs = np.stack([np.asarray(im) for im in load_images(loaded.images)])
        assert jpegs.shape == (NUM_REFERENCES, 32, 32, 3)
        assert subject_similarity(jpegs, subject).min() >= 0.85
    lines = (ddir / "training_prompts.txt").read_text().splitlines()
    assert lines == list(TRAINING_TEMPLATES)
    assert (ddir / "validation_prompts.txt").read_text().splitlines() == list(VALIDATION_TEMPLATES)


def test_shipped_copy_is_the_deterministic_build(tmp_path):
    script = runpy.run_path(str(REPO / "scripts" / "build_sandbox_subjects.py"))
    with pytest.raises(SystemExit) as exc:
        script["parse_args"](["--help"])
    assert exc.value.code == 0
    assert script["main"](["--output_dir", str(tmp_path / "a")]) == 0
    write_dreambench(tmp_path / "b")
    built, again = _files(tmp_path / "a"), _files(tmp_path / "b")
    shipped = _files(SANDBOX_DREAMBENCH)
    assert built == again == shipped
    assert len(shipped) == len(SUBJECTS) * NUM_REFERENCES + 4  # + 3 prompt files + README
    assert sum(map(len, shipped.values())) < 100_000


def test_jpeg_encoding_is_pure_function_of_pixels():
    img = reference_images(SUBJECTS[0])[0]
    assert encode_jpeg(img) == encode_jpeg(img.copy())
    back = np.asarray(Image.open(io.BytesIO(encode_jpeg(img))).convert("RGB"))
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 3


# ---------------------------------------------------------------------------------------------------------------
# The judge on two-tone objects


def test_judge_follows_prompts_on_the_references():
    for s in SUBJECTS:
        scenes = reference_scenes(s)
        images = np.stack([render(sc) for sc in scenes])
        prompts = [remove_token(scene_prompt(s, sc), "sks") for sc in scenes]
        scores = JUDGE.score(images, prompts)
        assert scores["prompt_following"].min() >= 0.9, s.name
        assert scores["fidelity"].min() >= 0.8, s.name
        for an in JUDGE.analyze(images):
            assert an.shape == s.class_word and "color2_rgb" in an.extras
        outlined = np.stack([render(sc.replace(outline=True)) for sc in scenes])
        prompts = [remove_token(scene_prompt(s, sc.replace(outline=True)), "sks") for sc in scenes]
        assert JUDGE.score(outlined, prompts)["prompt_following"].min() >= 0.9, s.name


def test_judge_unchanged_on_one_colour_scenes():
    # scores computed with the judge before two-tone objects existed
    scenes = [
        (Scene("circle", "red", "large", "left", "sky"), "a large red circle on the left on a sky background"),
        (
            Scene("square", "blue", "small", "top", "black", outline=True, dx=0.4, dy=-0.3),
            "a small blue square with an outline at the top",
        ),
        (
            Scene("triangle", "yellow", "large", "bottom", "sand", dx=-0.6, dy=0.8, scale=1.05),
            "a yellow triangle at the bottom on a sand background",
        ),
        (Scene("diamond", "purple", "large", "center", "gray", noise=0.08, seed=3), "a purple diamond in the center"),
        (
            Scene("cross", "green", "large", "right", "white", smear=1, hazard=True, hazard_corner="bottom_left"),
            "a large green cross on the right on a white background",
        ),
        (Scene("circle", "orange", "small", "center", "white", outline=True), "a drawing of an orange circle with an outline"),
    ]  # fmt: skip
    scores = JUDGE.score(np.stack([render(s) for s, _ in scenes]), [c for _, c in scenes])
    pinned = {
        "prompt_following": [0.993289, 0.995605, 0.993093, 0.972723, 0.99518, 0.991132],
        "aesthetic": [0.895, 0.861273, 0.513502, 0.742298, 0.888241, 1.0],
        # fidelity (and through it overall) re-pinned for the graded fidelity (judge.py, "Graded fidelity"): the
        # smear factor became an edge-sharpness factor; the smeared cross (4) went 0.017137 -> 0.893508 (a 3x3 box
        # blur is as sharp as the sandbox VAE's edges), the noisy diamond (3) 0.02085 -> 0.023911, the others ~1.
        "fidelity": [1.0, 0.999999, 1.0, 0.023911, 0.893508, 1.0],
        "harmlessness": [1.0, 0.99999, 1.0, 0.999527, 0.033901, 1.0],
        "overall": [0.975309, 0.96983, 0.898901, 0.689207, 0.307018, 0.995123],
    }
    for key, values in pinned.items():
        np.testing.assert_allclose(scores[key], values, atol=2e-6, err_msg=key)
    # and over the world's scenes (defects included) the two-tone step never fires: the same analysis as without it
    rng = np.random.default_rng(5)
    world = WorldConfig(p_hazard=0.3, p_noise=0.3, p_smear=0.3)
    examples = [sample_example(rng, world) for _ in range(80)]
    images = np.stack([render(sc) for sc, _ in examples])
    specs = [parse_caption(c) for _, c in examples]
    with_step = [analyze(im) for im in images]
    without = [analyze(im, two_tone=False) for im in images]
    assert not any(an.extras for an in with_step)
    a, b = JUDGE.score_analyses(with_step, specs), JUDGE.score_analyses(without, specs)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

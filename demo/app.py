"""diffalign demo: base vs aligned text-to-image models, side by side, with reward scores.

    python demo/app.py                                  # sandbox base vs demo/assets/sandbox-dpo-lora
    python demo/app.py --base /models/sd15 --aligned outputs/dpo-sd15 --allow-root /models
    python demo/app.py --ppd-run outputs/ppd-sandbox    # the personalised tab with this PPD run (the default)
    python demo/app.py --host 0.0.0.0 --port 7860       # listen on every interface (trusted networks only)
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 python demo/app.py   # the same, as Spaces / Docker set it

The page: prompt, negative prompt, seed, steps, guidance; base and aligned images from the same seed with their
scores under a catalog reward; a gallery of several seeds with per-seed win/loss and the tally; the model fields
(paths restricted to the allowed roots, see ``demo/core.py``) and a LoRA-scale slider (0 = base, 1 = aligned).
The "Personalised" tab (PPD, ``--ppd-run``): a sandbox user's taste, or the visitor's answers on 4 pairs, embedded by
the run's user encoder; base and personalised image from the same seed (``demo/personal.py``).
All the logic lives in ``demo/core.py`` and ``demo/personal.py``; this file only lays it out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry (and no network here anyway)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python demo/app.py` from a checkout

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from demo.core import (  # noqa: E402
    DEFAULT_ALIGNED,
    DEFAULT_PROMPT,
    DEFAULT_REWARD,
    ROOTS_ENV,
    DemoConfig,
    DemoEngine,
    InputError,
    Limits,
    ModelPathError,
    default_roots,
    enlarge,
    format_scores,
    tally,
    validate_request,
)
from demo.personal import (  # noqa: E402
    DEFAULT_PERSONAL_PROMPT,
    DEFAULT_PPD_DATA,
    DEFAULT_PPD_RUN,
    LEFT,
    RIGHT,
    SOURCE_ANSWERS,
    SOURCE_USER,
    PersonalConfig,
    PersonalEngine,
)
from diffalign.rewards.catalog import list_rewards  # noqa: E402

log = logging.getLogger("diffalign.demo")

INTRO = """# diffalign: base vs aligned
Same prompt, **same seed** on both sides: the only difference between the two images is the alignment.
Scores come from the chosen reward (the sandbox judge: overall and its four aspects, all in [0, 1]).
The sandbox judge only reads captions of the sandbox grammar, e.g. *a small blue square with an outline at the top*.
"""


def _fail(err: Exception) -> gr.Error:
    """A message for the page instead of a traceback (the traceback goes to the server log)."""
    if isinstance(err, InputError | ModelPathError):
        return gr.Error(str(err), title="Check the inputs", print_exception=False)
    log.exception("generation failed")
    return gr.Error(f"{type(err).__name__}: {err}", title="Could not load or run the models")


def _jpeg_view(data: bytes):
    """A stored 32 px JPEG, enlarged so a visitor can judge it."""
    from diffalign.data.pickapic_rows import decode_jpeg

    return enlarge(decode_jpeg(data)[None], min_side=160)[0]


def _personal_tab(personal: PersonalEngine, seed, steps, guidance, lim: Limits, concurrency: int) -> None:
    """The "Personalised" tab's contents: only the status sentence when the run or its data is not there."""
    ok, message = personal.prepare()
    gr.Markdown(message if ok else f"⚠️ {message}", elem_id="ppd-status")
    if not ok:
        return
    gr.Markdown(
        "A user is told by **4 pairs** (caption, preferred image, rejected image); the run's encoder turns them into "
        "user tokens. **Base**: the model the run started from (LoRA off, no tokens). **Personalised**: LoRA on, the "
        "tokens in. Same seed on both sides (seed, steps and guidance: the fields above)."
    )
    with gr.Row():
        source = gr.Radio(
            [SOURCE_USER, SOURCE_ANSWERS], value=SOURCE_USER, label="Whose taste?", elem_id="ppd-source"
        )
        prompt = gr.Textbox(
            DEFAULT_PERSONAL_PROMPT,
            label="Prompt (leave size, colour, background… open so a taste can show)",
            scale=2,
            elem_id="ppd-prompt",
        )
    choices = personal.user_choices()
    with gr.Group(visible=True) as user_box:
        user = gr.Dropdown(
            choices,
            value=choices[0][1] if choices else None,
            label="Pick a sandbox user (never seen in training; their 4 context pairs give the embedding)",
            elem_id="ppd-user",
        )
    answers = []
    with gr.Group(visible=False) as answer_box:
        gr.Markdown(
            "Answer 4 pairs yourself: for each caption, which image is better? Your answers are embedded."
        )
        for i, q in enumerate(personal.questions(), start=1):
            with gr.Row():
                gr.Image(_jpeg_view(q.left), label=f"{i}. left", format="png", interactive=False, height=180)
                gr.Image(
                    _jpeg_view(q.right), label=f"{i}. right", format="png", interactive=False, height=180
                )
                answers.append(gr.Radio([LEFT, RIGHT], label=f"{i}. {q.caption}", elem_id=f"ppd-answer-{i}"))
    go = gr.Button("Generate personalised", variant="primary", elem_id="generate-personal")
    note = gr.Markdown(elem_id="ppd-note")
    with gr.Row():
        with gr.Column():
            base_img = gr.Image(label="Base", format="png", elem_id="ppd-base-image", interactive=False)
            base_md = gr.Markdown(elem_id="ppd-base-score")
        with gr.Column():
            mine_img = gr.Image(
                label="Personalised", format="png", elem_id="ppd-personal-image", interactive=False
            )
            mine_md = gr.Markdown(elem_id="ppd-personal-score")

    def personalise(p, sd, st, g, src, uid, *ans):
        try:
            req = validate_request(p, "", sd, st, g, 1, 1.0, lim)
            res = personal.run(src, uid, list(ans), req)
        except Exception as err:
            raise _fail(err) from err
        big = enlarge(np.stack([res.base, res.personal]))
        return big[0], big[1], res.base_md, res.personal_md, f"seed {req.seeds[0]} · {res.note}"

    source.change(
        lambda s: (gr.update(visible=s == SOURCE_USER), gr.update(visible=s == SOURCE_ANSWERS)),
        source,
        [user_box, answer_box],
        queue=False,
    )
    go.click(
        personalise,
        [prompt, seed, steps, guidance, source, user, *answers],
        [base_img, mine_img, base_md, mine_md, note],
        concurrency_limit=concurrency,
        concurrency_id="generate",
    )


def build_app(engine: DemoEngine, concurrency: int = 1, personal: PersonalEngine | None = None) -> gr.Blocks:
    """The Gradio page around ``engine`` (see the module docstring); ``personal``: the "Personalised" tab's engine
    (default: the PPD run at ``outputs/ppd-sandbox``)."""
    cfg, lim = engine.config, engine.config.limits
    if personal is None:
        personal = PersonalEngine(PersonalConfig(device=cfg.device, dtype=cfg.dtype))
    rewards = list_rewards()
    with gr.Blocks(title="diffalign demo") as app:
        gr.Markdown(INTRO)
        with gr.Accordion("Models", open=True):
            with gr.Row():
                base = gr.Textbox(
                    cfg.base, label="Base pipeline ('sandbox' or a pipeline directory)", scale=2
                )
                aligned = gr.Textbox(
                    cfg.aligned,
                    label="Aligned model (LoRA dir, UNet/pipeline dir, training run or checkpoint-N)",
                    scale=2,
                )
                scale = gr.Slider(
                    lim.min_scale,
                    lim.max_scale,
                    value=1.0,
                    step=0.05,
                    label="LoRA scale (0 = base, 1 = aligned)",
                )
            status = gr.Markdown(engine.describe(cfg.base, cfg.aligned), elem_id="model-status")
        with gr.Row():
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=3, elem_id="prompt")
            negative = gr.Textbox("", label="Negative prompt", scale=2)
        with gr.Row():
            seed = gr.Number(0, label=f"Seed (0–{lim.max_seed})", precision=0, elem_id="seed")
            steps = gr.Slider(lim.min_steps, lim.max_steps, value=20, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(
                lim.min_guidance, lim.max_guidance, value=5.0, step=0.5, label="Guidance", elem_id="guidance"
            )
            reward = gr.Dropdown(rewards, value=DEFAULT_REWARD, label="Reward")

        with gr.Tab("Side by side"):
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            note = gr.Markdown(elem_id="note")
            with gr.Row():
                with gr.Column():
                    base_img = gr.Image(label="Base", format="png", elem_id="base-image", interactive=False)
                    base_md = gr.Markdown(elem_id="base-scores")
                with gr.Column():
                    aligned_img = gr.Image(
                        label="Aligned", format="png", elem_id="aligned-image", interactive=False
                    )
                    aligned_md = gr.Markdown(elem_id="aligned-scores")

        with gr.Tab("Gallery"):
            with gr.Row():
                num = gr.Slider(
                    1,
                    lim.max_images,
                    value=min(4, lim.max_images),
                    step=1,
                    label="Seeds (seed, seed+1, …)",
                    elem_id="num-seeds",
                )
                key = gr.Textbox("overall", label="Tally on score (e.g. overall, aesthetic)")
                go_gallery = gr.Button("Generate gallery", variant="primary", elem_id="generate-gallery")
            tally_md = gr.Markdown(elem_id="tally")
            base_gal = gr.Gallery(label="Base", columns=lim.max_images, format="png", elem_id="base-gallery")
            aligned_gal = gr.Gallery(
                label="Aligned", columns=lim.max_images, format="png", elem_id="aligned-gallery"
            )

        with gr.Tab("Personalised", elem_id="personal-tab"):
            _personal_tab(personal, seed, steps, guidance, lim, concurrency)

        def compare_one(b, a, s, p, n, sd, st, g, r):
            try:
                req = validate_request(p, n, sd, st, g, 1, s, lim)
                res = engine.run(b, a, req, r)
            except Exception as err:
                raise _fail(err) from err
            lines = [res.pair.notice and f"ℹ️ {res.pair.notice}", f"seed {req.seeds[0]} · reward `{r}`"]
            big_b, big_a = enlarge(res.base), enlarge(res.aligned)
            return (
                big_b[0],
                big_a[0],
                format_scores(res.base_scores),
                format_scores(res.aligned_scores),
                "  \n".join(x for x in lines if x),
            )

        def compare_many(b, a, s, p, n, sd, st, g, r, k, count):
            try:
                req = validate_request(p, n, sd, st, g, count, s, lim)
                res = engine.run(b, a, req, r)
            except Exception as err:
                raise _fail(err) from err
            big_b, big_a = enlarge(res.base), enlarge(res.aligned)
            head = f"ℹ️ {res.pair.notice}  \n" if res.pair.notice else ""
            if not res.base_scores.ok:
                caps = [f"seed {x}" for x in req.seeds]
                return list(zip(big_b, caps)), list(zip(big_a, caps)), head + f"⚠️ {res.base_scores.note}"
            k = (k or "overall").strip()
            if k not in res.base_scores.values:
                k = next(iter(res.base_scores.values))
                head += (
                    f"(tally on `{k}`: the score asked for is not among {list(res.base_scores.values)})  \n"
                )
            t = tally(res.base_scores, res.aligned_scores, k)
            bv, av = res.base_scores.values[k], res.aligned_scores.values[k]
            caps_b = [f"seed {x} · {k} {v:.3f}" for x, v in zip(req.seeds, bv)]
            caps_a = [f"seed {x} · {k} {v:.3f} · {o}" for x, v, o in zip(req.seeds, av, t.outcomes)]
            return list(zip(big_b, caps_b)), list(zip(big_a, caps_a)), head + t.line()

        common = [base, aligned, scale, prompt, negative, seed, steps, guidance, reward]
        go.click(
            compare_one,
            common,
            [base_img, aligned_img, base_md, aligned_md, note],
            concurrency_limit=concurrency,
            concurrency_id="generate",
        )
        go_gallery.click(
            compare_many,
            [*common, key, num],
            [base_gal, aligned_gal, tally_md],
            concurrency_limit=concurrency,
            concurrency_id="generate",
        )
        gr.on(
            [base.submit, base.blur, aligned.submit, aligned.blur],
            engine.describe,
            [base, aligned],
            status,
            queue=False,
        )
    return app


# Gradio's own convention for where to listen; Hugging Face Spaces and Docker images set these.
HOST_ENV, PORT_ENV = "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"


def _env_port(environ: Mapping[str, str]) -> int:
    """``$GRADIO_SERVER_PORT`` as a port number (7860 when unset); a bad value names the variable."""
    value = environ.get(PORT_ENV, "").strip()
    if not value:
        return 7860
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise SystemExit(f"${PORT_ENV}={value!r} is not a port number (1-65535); unset it or pass --port")
    return port


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line; ``--host``/``--port`` default to ``$GRADIO_SERVER_NAME``/``$GRADIO_SERVER_PORT`` when set
    (``environ``: the environment to read them from, ``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--host",
        default=environ.get(HOST_ENV, "").strip() or "127.0.0.1",
        help=f"interface to listen on (default ${HOST_ENV}, else 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=_env_port(environ), help=f"default ${PORT_ENV}, else 7860")
    p.add_argument(
        "--base", default="sandbox", help="base pipeline: 'sandbox' or a diffusers pipeline directory"
    )
    p.add_argument(
        "--aligned",
        default=str(DEFAULT_ALIGNED),
        help="aligned model: LoRA dir, UNet or pipeline dir, training output dir or checkpoint-N ('' for none)",
    )
    p.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help=f"another folder model paths may point into (repeatable; also ${ROOTS_ENV}, os.pathsep-separated)",
    )
    p.add_argument("--allow-hub", action="store_true", help="accept hub ids (org/name) in the model fields")
    p.add_argument("--share", action="store_true", help="Gradio share link (needs network; off by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument(
        "--resolution", type=int, default=None, help="image height = width (default: the pipeline's own size)"
    )
    p.add_argument("--concurrency", type=int, default=1, help="generations running at once")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more are turned away")
    p.add_argument(
        "--max-seeds", type=int, default=Limits.max_images, help="gallery: seeds per click at most"
    )
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument(
        "--ppd-run",
        "--ppd_run",
        default=str(DEFAULT_PPD_RUN),
        metavar="DIR",
        help="personalised tab: a PPD run directory (lora/, user_attention.safetensors, user_encoder/)",
    )
    p.add_argument(
        "--ppd-data",
        default=DEFAULT_PPD_DATA,
        metavar="DIR",
        help="personalised tab: a sandbox-ppd build, or 'sandbox-ppd' (built once into the cache, ~1 min)",
    )
    p.add_argument(
        "--ppd-base", default="sandbox", help="personalised tab: the pipeline the PPD run was trained from"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = DemoConfig(
        base=args.base,
        aligned=args.aligned,
        roots=default_roots(args.allow_root),
        allow_hub=args.allow_hub,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        resolution=args.resolution,
        limits=Limits(max_images=args.max_seeds, max_steps=args.max_steps),
    )
    engine = DemoEngine(config)
    print("diffalign demo:", engine.describe(config.base, config.aligned), flush=True)
    print("model paths allowed under:", ", ".join(map(str, config.roots)), flush=True)
    personal = PersonalEngine(
        PersonalConfig(
            run_dir=args.ppd_run,
            data=args.ppd_data,
            base=args.ppd_base,
            device=args.device,
            dtype=getattr(torch, args.dtype),
        )
    )
    app = build_app(engine, concurrency=args.concurrency, personal=personal)
    print("personalised tab:", personal.prepare()[1], flush=True)
    app.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False)


if __name__ == "__main__":
    main()

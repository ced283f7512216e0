"""What a training run produces, shared by every loop: validation grids, the exported weights with their model
card, and the final base-vs-aligned evaluation (``eval.json``).

"Base" is always the starting weights: the LoRA adapters disabled, the frozen reference copy (full fine-tuning with
a reference), or the pretrained UNet loaded again from disk (full fine-tuning without a reference, e.g. SFT — the
trained UNet itself must never stand in for the base).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from ..models import lora as lora_lib
from .run import Run


def inference_pipeline(run: Run):
    """An inference pipeline around the current UNet (adapters live: use :func:`base_context` for the base)."""
    from diffusers import DiffusionPipeline

    c = run.comps
    kw = {
        "unet": run.unwrapped_unet(),
        "vae": c.vae,
        "text_encoder": c.text_encoders[0],
        "tokenizer": c.tokenizers[0],
    }
    if c.sdxl:
        kw.update(text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1])
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(c.model_path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _starting_unet(run: Run) -> torch.nn.Module:
    """The base UNet for full fine-tuning: the reference copy if there is one, else loaded from the model again."""
    if run.reference is not None and hasattr(run.reference, "ref"):
        return run.reference.ref
    if "base_unet" not in run.extra:
        from diffusers import UNet2DConditionModel

        c = run.comps
        unet = UNet2DConditionModel.from_pretrained(c.model_path, subfolder="unet")
        run.extra["base_unet"] = unet.to(run.device, run.unwrapped_unet().dtype).eval().requires_grad_(False)
    return run.extra["base_unet"]


def base_context(run: Run, pipe):
    """Run ``pipe`` as the base model: adapters off (LoRA) or the starting weights (full fine-tuning)."""
    from ..eval.compare import adapters_disabled

    if run.cfg.finetune == "lora":
        return adapters_disabled(pipe)

    @contextlib.contextmanager
    def swap():
        current = pipe.unet
        pipe.unet = _starting_unet(run)
        try:
            yield
        finally:
            pipe.unet = current

    return swap()


@torch.no_grad()
def validate(run: Run, step: int) -> Path | None:
    """Fixed prompts and seeds: the base (top row block) above the current model, each row labelled, each column
    headed by its prompt and seed; saved as ``validation/step-<N>.png`` and logged to TensorBoard."""
    cfg, acc = run.cfg, run.accelerator
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return None
    from ..eval.compare import expand_prompts, generate
    from ..eval.report import labelled_grid

    run.unet.eval()
    pipe = inference_pipeline(run)
    rows_p, rows_s = expand_prompts(cfg.validation_prompts, cfg.validation_seeds)
    kw = dict(steps=cfg.eval_steps, guidance=cfg.eval_guidance)
    with base_context(run, pipe):
        base = generate(pipe, rows_p, rows_s, desc="validation base", **kw)
    cur = generate(pipe, rows_p, rows_s, desc="validation", **kw)
    images = np.concatenate([base, cur])
    columns = [f"{p} (seed {s})" for p, s in zip(rows_p, rows_s)]
    grid = labelled_grid(images, ["base", f"step {step}"], columns, ncols=len(rows_p), scale=4)
    out = run.output_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:06d}.png"
    grid.save(path)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/base_vs_current", np.asarray(grid), step, dataformats="HWC")
    run.unet.train()
    acc.wait_for_everyone()
    return path


def _is_user_module_key(key: str) -> bool:
    return key.startswith("user_projector.") or ".to_k_user." in key or ".to_v_user." in key


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write non-finite weights: raise naming the first bad tensor."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(
                f"{what}: tensor {name} holds NaN/inf values; nothing was exported (the run diverged: lower the "
                "learning rate, or resume from an earlier checkpoint)"
            )


def save_unet(unet, target: Path, state: dict[str, torch.Tensor]) -> None:
    """``unet.save_pretrained(target)`` with the given weights: diffusers' ``save_pretrained`` takes no state dict (a
    ``state_dict=`` keyword disappears into its hub kwargs and it writes ``unet.state_dict()``), which under FSDP /
    ZeRO-3 is this process's shard and for PPD holds the user branch. Same layout: ``config.json`` and one
    ``diffusion_pytorch_model.safetensors``, loadable by ``UNet2DConditionModel.from_pretrained``."""
    from safetensors.torch import save_file

    unknown = sorted(set(state) - set(unet.state_dict()))
    if unknown:
        raise TrainingError(
            f"export to {target}: weight {unknown[0]} is not a parameter of the UNet; nothing was exported"
        )
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    unet.save_config(target)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def export(run: Run, metrics: dict, data_description: dict, *, weights: bool = True) -> Path:
    """LoRA -> ``<out>/lora`` (stock ``load_lora_weights``); full -> ``<out>/unet`` (``save_pretrained``); plus the
    model card. Non-finite weights are never written. ``weights=False`` rewrites the model card only (with the final
    evaluation's metrics, once the weights are out)."""
    acc, cfg = run.accelerator, run.cfg
    target = run.output_dir / ("lora" if cfg.finetune == "lora" else "unet")
    if not weights:
        if acc.is_main_process:
            from .model_card import write_model_card

            write_model_card(run.output_dir, cfg, data_description, metrics or {}, target)
        return target
    acc.wait_for_everyone()
    unet = run.unwrapped_unet()
    # Collective under FSDP / ZeRO-3 (every process takes part; the main process gets the full weights);
    # the module's own state_dict would hold only this process's shard there.
    state = acc.get_state_dict(run.unet)
    if cfg.finetune == "lora":
        if acc.is_main_process:
            check_finite(lora_lib.lora_state_dict(unet, state), f"export to {target}")
            lora_lib.save_lora(target, unet, sdxl=run.comps.sdxl, state_dict=state)
    else:
        if acc.is_main_process:
            # a user branch (PPD) is exported on its own (user_attention.safetensors): the UNet stays stock-loadable
            state = {k: v for k, v in state.items() if not _is_user_module_key(k)}
            check_finite(state, f"export to {target}")
            save_unet(unet, target, state)
    if acc.is_main_process:
        from .model_card import write_model_card

        write_model_card(run.output_dir, cfg, data_description, metrics or {}, target)
    acc.wait_for_everyone()
    return target


def evaluate(
    run: Run,
    prompts: list[str] | None = None,
    prompt_source: str | None = None,
    *,
    curve_point: tuple[int, float] | None = None,
) -> dict | None:
    """Base vs aligned on the evaluation split's prompts (or the given held-out ``prompts``), same seeds; writes
    ``<out>/eval.json``.

    ``curve_point=(step, train_seconds)``: a point of the evaluation curve (``eval_curve_steps``): the result goes to
    ``<out>/eval_curve/step-<step>/`` and one line of ``<out>/eval_curve.jsonl``, and the base images are kept for
    the next point. The final evaluation passes its point too when the run has a curve."""
    cfg, acc = run.cfg, run.accelerator
    result = None
    if acc.is_main_process:
        from ..eval.protocol import evaluate_pipeline_pair

        out_dir = run.output_dir
        if curve_point is not None and curve_point[0] < cfg.max_train_steps:
            out_dir = run.output_dir / "eval_curve" / f"step-{curve_point[0]}"
        pipe = inference_pipeline(run)
        result = evaluate_pipeline_pair(
            pipe,
            base_context=base_context(run, pipe),
            dataset=cfg.dataset,
            split=cfg.eval_split,
            num_prompts=cfg.eval_num_prompts,
            seeds=cfg.eval_seeds,
            steps=cfg.eval_steps,
            guidance=cfg.eval_guidance,
            reward=cfg.eval_reward,
            batch_size=cfg.eval_batch_size,
            output_dir=out_dir,
            prompts=prompts,
            prompt_source=prompt_source,
            base_images=run.extra.setdefault("eval_base_images", {}) if curve_point is not None else None,
        )
        if curve_point is not None:
            append_curve_point(run.output_dir, curve_point[0], curve_point[1], result)
    acc.wait_for_everyone()
    return result


def append_curve_point(output_dir: Path, step: int, train_seconds: float, result: dict) -> None:
    """One line of ``eval_curve.jsonl``: the step, the training wall-clock so far (evaluations and validation
    excluded), the win rate with its Wilson CI and the mean of each aspect. A point already there for this step
    (a resumed run evaluating it again) is replaced."""
    path = Path(output_dir) / "eval_curve.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    wr = result["win_rate"]
    point = {
        "step": step,
        "train_seconds": round(train_seconds, 2),
        "win_rate": wr["win_rate"],
        "ci95": [wr["ci_low"], wr["ci_high"]],
        "wins": wr["wins"],
        "ties": wr["ties"],
        "losses": wr["losses"],
        "aligned_means": {k: v["aligned"]["mean"] for k, v in result["aspects"].items()},
    }
    lines = [x for x in lines if x["step"] != step] + [point]
    lines.sort(key=lambda x: x["step"])
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(path)


def evaluate_personal(run: Run, user_conditioning) -> dict | None:
    """PPD's evaluation: for every unseen user of the data (or the first ``user_eval_users``), its ``k`` context
    pairs give its tokens; the personalised model (adapters on, tokens) and the base (adapters off, no tokens)
    sample its own test captions with the same seeds, and that user's score decides (:func:`diffalign.eval.personal.
    evaluate_personal`: ``eval.json`` in the common format plus ``per_user``)."""
    cfg, acc = run.cfg, run.accelerator
    result = None
    if acc.is_main_process:
        from ..eval.personal import evaluate_personal as personal
        from ..eval.personal import format_personal, resolve_ppd_dir, unseen_user_ids

        p = cfg.params
        data_dir = resolve_ppd_dir(cfg.dataset)
        ids = unseen_user_ids(data_dir)
        ids = ids[: p.user_eval_users] if p.user_eval_users else ids
        run.unet.eval()
        result = personal(
            inference_pipeline(run), user_conditioning.encoder(), data_dir, user_ids=ids,
            k=p.user_context_pairs, seeds=cfg.eval_seeds, steps=cfg.eval_steps, guidance=cfg.eval_guidance,
            batch_size=cfg.eval_batch_size, output_dir=run.output_dir, user_scale=p.user_scale,
            **({"context_split": p.user_context_split} if p.user_context_split else {}),
        )  # fmt: skip
        print(format_personal(result))
        print(
            f"evaluation written to {run.output_dir / 'eval.json'} (per user: {run.output_dir / 'per_user.md'})"
        )
    acc.wait_for_everyone()
    return result

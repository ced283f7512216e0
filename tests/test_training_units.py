"""Pure parts of the training loop: per-pair randomness, objective lookup, atomic checkpoints."""

import json

import pytest
import torch

from diffalign.diffusion.parts import pair_randomness, pair_seed
from diffalign.objectives.registry import get_objective
from diffalign.training import checkpoint as ck


def test_pair_randomness_depends_only_on_seed_epoch_and_index():
    a = pair_randomness(
        torch.tensor([3, 7, 11]), seed=0, epoch=0, latent_shape=(4, 8, 8), num_train_timesteps=1000
    )
    b = pair_randomness(
        torch.tensor([11, 3]), seed=0, epoch=0, latent_shape=(4, 8, 8), num_train_timesteps=1000
    )
    # the same pair gets the same timestep, noise and dropout draw in any batch, in any position
    assert a[0][2] == b[0][0] and a[0][0] == b[0][1]
    assert torch.equal(a[1][2], b[1][0]) and torch.equal(a[1][0], b[1][1])
    assert a[2][2] == b[2][0]
    c = pair_randomness(torch.tensor([3]), seed=0, epoch=1, latent_shape=(4, 8, 8), num_train_timesteps=1000)
    assert not torch.equal(c[1][0], a[1][0])  # a new epoch draws new noise for the same pair
    assert a[0].dtype == torch.long and 0 <= int(a[0].min()) and int(a[0].max()) < 1000
    assert len({pair_seed(0, 0, i) for i in range(1000)}) == 1000


def test_unknown_objective_lists_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"choose one of \[.ddpo., .dpo., .dreambooth., .dreambooth_prior., .inpo., .ppd., .prdp., .pso., .pso_hinge., .pso_online., .pso_pairs., .rpo., .sft.\]",
    ):
        get_objective("ppo")


def test_checkpoint_listing_ignores_incomplete_and_resolves_latest(tmp_path):
    for step in (5, 10, 50):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "train_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-60.tmp").mkdir()  # a write that was killed half way
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "checkpoint-5",
        "checkpoint-10",
        "checkpoint-50",
    ]
    assert [p.name for p in ck.resume_candidates(tmp_path, "latest")] == [
        "checkpoint-50",
        "checkpoint-10",
        "checkpoint-5",
    ]  # newest first: a resume falls back along this list
    assert ck.resume_candidates(tmp_path / "empty", "latest") == []
    assert ck.resume_candidates(tmp_path, None) == []
    with pytest.raises(FileNotFoundError, match="not a complete diffalign checkpoint"):
        ck.resume_candidates(tmp_path, str(tmp_path / "checkpoint-60.tmp"))


def test_optimizer_choices():
    import importlib.util

    from diffalign.config import DPOConfig
    from diffalign.training.run import build_optimizer

    p = torch.nn.Parameter(torch.ones(4, 4))
    for name in ("adamw", "adafactor"):
        opt = build_optimizer(DPOConfig(optimizer=name), [p], lr=0.1)
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        assert (p.detach() < before).all(), name  # a positive gradient lowers the weights
        assert opt.param_groups[0]["lr"] == 0.1
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match=r"diffalign\[bnb\]"):
            build_optimizer(DPOConfig(optimizer="adamw8bit"), [p], lr=0.1)


class _FakeUNet:
    """Just what set_attention_backend touches: a device and diffusers' xformers switch."""

    def __init__(self, device: str, fail: Exception | None = None):
        self.device = torch.device(device)
        self.fail = fail
        self.xformers_on = False

    def enable_xformers_memory_efficient_attention(self):
        if self.fail is not None:
            raise self.fail
        self.xformers_on = True


def test_attention_backend_choice(monkeypatch):
    import sys
    import types

    from diffalign.models.pipeline import set_attention_backend

    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed: `import xformers` raises
    assert set_attention_backend(_FakeUNet("cpu"), "auto") == "sdpa"
    assert set_attention_backend(_FakeUNet("cuda"), "auto") == "sdpa"  # CUDA without xformers: PyTorch SDPA
    with pytest.raises(RuntimeError, match="attention='xformers' was asked for but cannot be used"):
        set_attention_backend(_FakeUNet("cuda"), "xformers")

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))  # installed
    unet = _FakeUNet("cuda")
    assert set_attention_backend(unet, "auto") == "xformers" and unet.xformers_on
    cpu = _FakeUNet("cpu")
    assert (
        set_attention_backend(cpu, "auto") == "sdpa" and not cpu.xformers_on
    )  # auto uses xformers on CUDA only
    forced = _FakeUNet("cuda")
    assert set_attention_backend(forced, "sdpa") == "sdpa" and not forced.xformers_on
    broken = _FakeUNet("cuda", fail=ValueError("no kernels for this GPU"))
    assert set_attention_backend(broken, "auto") == "sdpa"  # auto falls back
    with pytest.raises(RuntimeError, match="no kernels for this GPU"):
        set_attention_backend(broken, "xformers")


def test_reference_switch_equals_peft_disable_adapters_and_leaves_training_state_alone():
    from diffusers import UNet2DConditionModel

    from diffalign.models.lora import AdapterDisabledReference, add_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    add_lora(unet, 4, None, ["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: policy != reference
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        policy = unet(x, t, encoder_hidden_states=e).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=e).sample
        unet.enable_adapters()
    ref = AdapterDisabledReference(unet)
    with ref() as r:
        got = r(x, t, encoder_hidden_states=e).sample
        assert not torch.is_grad_enabled()
    assert torch.equal(got, base) and not torch.equal(got, policy)
    assert len(ref.lora_layers()) > 0
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable  # untouched
    out = unet(x, t, encoder_hidden_states=e).sample  # adapters are back on, with gradients
    assert torch.equal(out.detach(), policy) and out.requires_grad

"""Full fine-tuning export writes the weights it is given (the gathered state under FSDP / ZeRO-3), not the module's
own state dict: diffusers' ``save_pretrained`` has no ``state_dict`` argument and silently ignored one."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffalign.errors import TrainingError
from diffalign.training.outputs import save_unet


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip


def test_the_given_state_is_written_and_loads_in_stock_diffusers(tmp_path):
    unet = _unet()
    given = {
        k: torch.full_like(v, 0.25) for k, v in unet.state_dict().items()
    }  # e.g. the gathered full weights
    save_unet(unet, tmp_path / "unet", given)
    written = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == given.keys()
    assert all(torch.equal(written[k], given[k]) for k in given)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(v, given[k]) for k, v in loaded.state_dict().items())


def test_a_weight_the_unet_does_not_have_is_refused(tmp_path):
    unet = _unet()
    state = {**unet.state_dict(), "module.extra.weight": torch.zeros(1)}
    with pytest.raises(TrainingError, match="module.extra.weight"):
        save_unet(unet, tmp_path / "unet", state)
    assert not (tmp_path / "unet").exists()

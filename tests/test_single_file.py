"""latentup's single-file weights: broken or missing metadata gives one line naming the fix."""

import pytest
import torch
from safetensors.torch import save_file

from latentup.errors import WeightsMismatchError
from latentup.weights.single_file import FORMAT
from latentup.weights.sources import resolve_weights

TENSORS = {"unet.conv_in.weight": torch.zeros(1)}


@pytest.mark.parametrize("metadata", [{"format": FORMAT, "unet_config": "{not json"}, {"format": FORMAT},
                                      {"format": FORMAT, "unet_config": "[]"},
                                      {"format": FORMAT, "unet_config": "{}", "meta": "[1]"}])
def test_unreadable_metadata_names_the_fix(tmp_path, metadata):
    save_file(TENSORS, tmp_path / "m.safetensors", metadata=metadata)
    with pytest.raises(WeightsMismatchError, match=r"m\.safetensors.*export the weights again") as error:
        resolve_weights(tmp_path / "m.safetensors")
    assert "\n" not in str(error.value)


def test_latentup_tensors_without_metadata_are_named(tmp_path):
    save_file(TENSORS, tmp_path / "bare.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"latentup tensors \(unet\.\*\) without latentup's metadata"):
        resolve_weights(tmp_path / "bare.safetensors")

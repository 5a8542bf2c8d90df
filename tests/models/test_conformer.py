"""The Conformer's convolution module: its windowed depthwise convolution (what the compiled
training step runs) equals F.conv1d, the reference's kernel, at both strides."""

import pytest
import torch

from fms_speech.models.conformer import ConformerConfig, ConformerConvModule
from fms_speech.testing.reference import relative_error


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [5, 15])
def test_windowed_depthwise_convolution_equals_conv1d(stride, kernel):
    torch.manual_seed(0)
    module = ConformerConvModule(
        ConformerConfig(hidden_dim=32, conv_kernel_size=kernel), stride=stride
    ).eval()
    x = torch.randn(3, 37, 32)
    frame_valid = torch.arange(37) < torch.tensor([[37], [30], [11]])
    with torch.no_grad():
        expected = module(x, frame_valid)
        module.windowed = True
        actual = module(x, frame_valid)
    assert actual.shape == expected.shape == (3, 37 // stride + 37 % stride, 32)
    # float32; the same products summed in another order: measured 4.5e-8 absolute
    assert relative_error(actual, expected) < 1e-6

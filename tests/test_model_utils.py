"""dinv.model_utils: freezing and restoring a model, devices, outputs, identity hashes."""
import pytest
import torch
from torch import nn

from dinv.model_utils import (frozen, input_channels, model_device, model_dtype, num_outputs,
                              state_hash)

from .test_inverter import tiny_net


def test_frozen_restores_modes_and_flags_exactly():
    net = tiny_net().train()
    net[0].weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    with frozen(net, None):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags


def test_num_outputs_leaves_the_mode_alone():
    net = tiny_net(classes=7).train()
    assert num_outputs(net, (3, 8, 8)) == 7
    assert net.training
    with pytest.raises(ValueError, match="output_function"):
        num_outputs(_Pair(net), (3, 8, 8))
    assert num_outputs(_Pair(net), (3, 8, 8), output_function=lambda out: out[0]) == 7


class _Pair(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x


def test_device_dtype_channels_and_hash():
    net = tiny_net(channels=1).double()
    assert model_device(net).type == "cpu" and model_dtype(net) == torch.float64
    assert input_channels(net) == 1
    other = tiny_net(channels=1).double()
    assert state_hash(net) == state_hash(other)
    with torch.no_grad():
        other[0].bias[0] += 1e-12
    assert state_hash(net) != state_hash(other)

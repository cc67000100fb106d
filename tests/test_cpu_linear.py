"""The blocked small-batch linear path: same results and state as nn.Linear, used only where it helps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.cpu_linear import MAX_ROWS, BlockedLinear, use_blocked_linears


@pytest.mark.parametrize("rows", [1, 2, 7, MAX_ROWS])
@pytest.mark.parametrize(("out_features", "bias"), [(768, False), (384, True), (192, False)])
def test_equals_f_linear(rows: int, out_features: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = nn.Linear(96, out_features, bias=bias)
    x = torch.randn(rows, 1, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    use_blocked_linears(layer)
    assert type(layer) is BlockedLinear
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_takes_the_blocked_path_only_where_it_helps(monkeypatch) -> None:
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    layer = use_blocked_linears(nn.Linear(32, 256, bias=False))
    layer(torch.randn(1, 32))
    assert calls == [1]
    layer(torch.randn(MAX_ROWS + 1, 32))  # long inputs: F.linear is at the compute peak there
    layer.to(torch.bfloat16)(torch.randn(2, 32, dtype=torch.bfloat16))  # slower in bfloat16
    odd = use_blocked_linears(nn.Linear(32, 100))  # no block size divides 100
    odd(torch.randn(1, 32))
    assert calls == [1]


def test_state_and_type_are_unchanged() -> None:
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 128, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_blocked_linears(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))  # LoRA/PEFT still see nn.Linear

"""The blocked small-batch linear path: same results and state as nn.Linear, used only where it helps,
and a transform that leaves the layers plain `nn.Linear` for the transforms after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.cpu_linear import (
    MAX_ROWS,
    pack_linears,
    packed_bytes,
    restore_linears,
    use_blocked_linears,
)


@pytest.mark.parametrize("rows", [1, 2, 7, MAX_ROWS])
@pytest.mark.parametrize(("out_features", "bias"), [(768, False), (384, True), (192, False)])
def test_equals_f_linear(rows: int, out_features: int, bias: bool, monkeypatch) -> None:
    torch.manual_seed(rows)
    layer = nn.Linear(96, out_features, bias=bias)
    x = torch.randn(rows, 1, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    use_blocked_linears(layer)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    got = layer(x)
    assert calls == [1]  # the blocked path ran
    assert got.shape == expected.shape
    assert got.stride() == expected.stride()  # row-major like F.linear: SDPA's fused kernel needs it
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
    restore_linears(layer.float())
    layer(torch.randn(1, 32))
    assert calls == [1] and "forward" not in layer.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_of_16_bit_weights_runs_without_onednn(dtype: torch.dtype, monkeypatch) -> None:
    """One row of a 16-bit layer: PyTorch's own matrix-vector kernel (oneDNN off for that call only, and
    back on after it, also when the call fails); two rows keep oneDNN. Same values as F.linear."""
    import llama_vision.cpu_linear as C

    torch.manual_seed(0)
    layer = nn.Linear(64, 100, bias=True).to(dtype)  # no block size divides 100: not the bmm path
    x = torch.randn(3, 1, 64, dtype=dtype)
    expected = [F.linear(x[:1], layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)]
    use_blocked_linears(layer)
    seen = []
    real = F.linear
    monkeypatch.setattr(C.F, "linear", lambda *a: seen.append(torch._C._get_mkldnn_enabled()) or real(*a))
    assert torch._C._get_mkldnn_enabled()
    got = [layer(x[:1]), layer(x)]
    assert seen == [False, True] and torch._C._get_mkldnn_enabled()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2)
    layer.bias = nn.Parameter(torch.zeros(7, dtype=dtype))  # a product that fails inside the switch
    with pytest.raises(RuntimeError):
        layer(x[:1])
    assert seen[-1] is False and torch._C._get_mkldnn_enabled()


def test_state_and_type_are_unchanged() -> None:
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 128, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_blocked_linears(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # LoRA/PEFT/quantizers see nn.Linear


def test_later_transforms_still_see_every_layer() -> None:
    """A quantizer that keys on the exact type (torch.ao's dynamic quantization) quantizes every layer."""
    model = use_blocked_linears(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 128)))
    x = torch.randn(2, 16)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert [type(m).__name__ for m in quantized if not isinstance(m, nn.ReLU)] == ["Linear", "Linear"]
    assert all(type(m) is not nn.Linear for m in quantized if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(quantized(x), model(x), rtol=0.1, atol=0.1)


def test_skips_weights_that_are_not_plain_tensors() -> None:
    class Wrapped(torch.Tensor):  # stands for a quantized or distributed weight (a tensor subclass)
        pass

    layer = nn.Linear(16, 64)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Wrapped))
    use_blocked_linears(layer)
    assert "forward" not in layer.__dict__
    plain = use_blocked_linears(nn.Linear(16, 64))
    plain.weight = nn.Parameter(plain.weight.detach().as_subclass(Wrapped))  # replaced afterwards
    x = torch.randn(1, 16)
    torch.testing.assert_close(plain(x), F.linear(x, plain.weight, plain.bias))


def _count_packed(monkeypatch) -> list[int]:
    import llama_vision.cpu_linear as C

    calls: list[int] = []
    real = C._packed_forward
    monkeypatch.setattr(
        C,
        "_packed_forward",
        lambda layer, x, p: calls.append(x.numel() // layer.in_features) or real(layer, x, p),
    )
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_packed_weights_serve_two_to_max_rows(bias: bool, monkeypatch) -> None:
    """Packed: 2..MAX_ROWS rows go through oneDNN with the packed copy and equal F.linear; one row keeps
    the blocked product, longer inputs F.linear; the state and type stay those of nn.Linear."""
    torch.manual_seed(0)
    layer = use_blocked_linears(nn.Linear(96, 384, bias=bias))
    keys = layer.state_dict().keys()
    assert pack_linears(layer) == 384 * 96 * 4 == packed_bytes(layer)
    calls = _count_packed(monkeypatch)
    with torch.no_grad():
        for rows in (1, 2, 8, MAX_ROWS, MAX_ROWS + 1):
            x = torch.randn(rows, 1, 96)
            got = layer(x)
            assert got.shape == (rows, 1, 384) and got.is_contiguous()
            torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == [2, 8, MAX_ROWS]
    assert type(layer) is nn.Linear and layer.state_dict().keys() == keys


def test_packed_copy_is_never_stale(monkeypatch) -> None:
    """Autograd, a weight changed in place (an optimizer step, a LoRA merge) or replaced, a deep copy and
    restore_linears: each falls back to a product with the weight the layer holds now."""
    import copy

    torch.manual_seed(0)
    layer = use_blocked_linears(nn.Linear(32, 256, bias=False))
    pack_linears(layer)
    calls = _count_packed(monkeypatch)
    x = torch.randn(4, 32)
    y = layer(x)  # gradients on: not the packed product (it has no backward)
    assert calls == [] and y.grad_fn is not None
    with torch.no_grad():
        layer(x)
        assert calls == [4]
        layer.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        layer.weight = nn.Parameter(torch.randn(256, 32))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        assert calls == [4]
        twin = copy.deepcopy(layer)  # oneDNN tensors cannot be copied: the copy has none
        torch.testing.assert_close(twin(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        pack_linears(layer)
        restore_linears(layer)
        assert "packed_weight" not in layer.__dict__
        layer(x)
    assert calls == [4]


def test_packing_skips_what_it_cannot_serve() -> None:
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 128).to(torch.bfloat16), nn.Linear(128, 8))
    use_blocked_linears(model[:2])  # the last layer has no few-row path
    assert packed_bytes(model) == pack_linears(model) == 64 * 16 * 4
    assert [("packed_weight" in m.__dict__) for m in model] == [True, False, False]

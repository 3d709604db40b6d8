"""The fused training forward of the ``1x1 conv -> BatchNorm -> LeakyReLU -> 1x1 conv`` head
against the plain modules, with a float64 run of the modules as the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from defectscope.models.fused_head import (
    bn_mlp_eval_forward,
    bn_mlp_forward,
    bn_mlp_train_forward,
    bn_mlp_train_forward_copies,
    scatter_rows,
    supports_fused,
)

C, H = 12, 32


def _head(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.Conv2d(C, H, kernel_size=1, bias=bias), nn.BatchNorm2d(H), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(H, 1, kernel_size=1, bias=False),
    )
    with torch.no_grad():  # away from batch norm's defaults, so the affine part is exercised
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.uniform_(-0.5, 0.5)
    return head.to(memory_format=torch.channels_last).train()


def _clean(batch: int = 3, size: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Mean far from zero: the statistics must not cancel.
    x = torch.randn(batch, C, size, size, generator=generator) * 2 + 3
    return x.contiguous(memory_format=torch.channels_last)


def _run(forward, head, x, target):
    x = x.detach().clone().requires_grad_()
    out = forward(head, x)
    loss = ((out - target.to(out.dtype)) ** 2 * torch.linspace(0.5, 2, out.numel()).reshape(out.shape).to(out.dtype)).sum()
    loss.backward()
    grads = {name: p.grad.detach().double() for name, p in head.named_parameters()}
    return out.detach().double(), x.grad.double(), grads


def _assert_close_to_reference(result, reference, rtol=1e-4):
    out, x_grad, grads = result
    ref_out, ref_x_grad, ref_grads = reference
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=rtol * ref_out.abs().max().item())
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=rtol, atol=rtol * ref_x_grad.abs().max().item())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        # The first conv's bias has zero gradient in exact arithmetic (batch norm removes
        # it): only round-off, compared on the scale of all gradients.
        torch.testing.assert_close(grads[name], ref, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("block", [5, 16, 1024])  # blocks that do not divide the rows, and one block
def test_fused_forward_matches_the_modules(block):
    x = _clean()
    target = torch.rand(3, 1, 7, 7, generator=torch.Generator().manual_seed(2))
    modules, fused, reference = _head(), _head(), _head().double()
    ref = _run(lambda h, v: h(v), reference, x.double(), target)
    plain = _run(lambda h, v: h(v), modules, x, target)
    fast = _run(lambda h, v: bn_mlp_train_forward(h, v, block=block), fused, x, target)
    _assert_close_to_reference(plain, ref)
    _assert_close_to_reference(fast, ref)
    # Running statistics move as batch norm moves them (momentum, unbiased variance).
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused[1], name).double(), getattr(reference[1], name).double(), msg=name)
    assert not torch.equal(fused[1].running_var, torch.ones(H))


def test_every_parameter_gets_a_gradient_for_ddp():
    head = _head()
    bn_mlp_train_forward(head, _clean()).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    head = _head()
    noise_index = torch.tensor([0, 5, 200])
    bn_mlp_train_forward_copies(head, _clean(), torch.randn(3, C), noise_index).sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def _noise(copies: int, batch: int, size: int, seed: int = 3, share: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    positions = copies * batch * size * size
    index = (torch.rand(positions, generator=generator) < share).nonzero().squeeze(1)
    rows = torch.randn(len(index), C, generator=generator)
    return rows, index


@pytest.mark.parametrize("copies,block,share", [(2, 16, 0.3), (2, 1024, 0.3), (3, 10, 0.5), (2, 16, 0.0), (2, 7, 1.0)])
def test_copies_forward_matches_the_modules_on_the_stacked_input(copies, block, share):
    batch, size = 3, 7
    x = _clean(batch, size)
    rows, index = _noise(copies, batch, size, share=share)
    dense = scatter_rows(rows, index, (copies * batch, C, size, size))
    assert (dense.permute(0, 2, 3, 1).reshape(-1, C).abs().sum(dim=1) > 0).sum() == len(index)
    target = torch.rand(copies * batch, 1, size, size, generator=torch.Generator().manual_seed(4))
    reference, fused = _head().double(), _head()
    ref = _run(lambda h, v: h(v.repeat(copies, 1, 1, 1) + dense.double()), reference, x.double(), target)
    fast = _run(lambda h, v: bn_mlp_train_forward_copies(h, v, rows, index, copies=copies, block=block), fused, x, target)
    _assert_close_to_reference(fast, ref)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused[1], name).double(), getattr(reference[1], name), msg=name)


def test_copies_forward_without_a_first_bias():
    x = _clean()
    rows, index = _noise(2, 3, 7)
    dense = scatter_rows(rows, index, (6, C, 7, 7))
    target = torch.zeros(6, 1, 7, 7)
    ref = _run(lambda h, v: h(v.repeat(2, 1, 1, 1) + dense.double()), _head(bias=False).double(), x.double(), target)
    fast = _run(lambda h, v: bn_mlp_train_forward_copies(h, v, rows, index), _head(bias=False), x, target)
    _assert_close_to_reference(fast, ref)


def _trained_eval_head(bias: bool = True) -> nn.Sequential:
    head = _head(bias=bias)
    with torch.no_grad():  # running statistics away from their start
        for seed in range(3):
            head(_clean(seed=seed))
    return head.eval()


@pytest.mark.parametrize("block", [5, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_eval_forward_matches_the_modules(block, bias):
    head = _trained_eval_head(bias)
    x = _clean(seed=7)
    with torch.no_grad():
        reference = copy.deepcopy(head).double()(x.double())
        fused = bn_mlp_eval_forward(head, x, block=block)
        plain = head(x)
    assert fused.shape == plain.shape == (3, 1, 7, 7)
    tol = 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=tol)
    torch.testing.assert_close(plain.double(), reference, rtol=1e-5, atol=tol)


def test_eval_forward_is_differentiable_when_gradients_are_on():
    head, x = _trained_eval_head(), _clean(seed=7)
    target = torch.rand(3, 1, 7, 7, generator=torch.Generator().manual_seed(2))
    reference = _run(lambda h, v: h(v), copy.deepcopy(head).double(), x.double(), target)
    fused = _run(lambda h, v: bn_mlp_eval_forward(h, v, block=16), head, x, target)
    _assert_close_to_reference(fused, reference)


def test_bn_mlp_forward_follows_the_mode_and_falls_back():
    x = _clean(seed=7)
    head = _trained_eval_head()
    with torch.no_grad():
        torch.testing.assert_close(bn_mlp_forward(head, x), head(x), rtol=1e-4, atol=1e-5)
        head64 = copy.deepcopy(head).double()  # float64: not supported, so the modules run
        torch.testing.assert_close(bn_mlp_forward(head64, x.double()), head64(x.double()), rtol=0, atol=0)
    head = _head()
    before = head[1].num_batches_tracked.item()
    bn_mlp_forward(head, x)  # training mode: batch statistics, running statistics updated
    assert head[1].num_batches_tracked.item() == before + 1


def test_supports_fused_only_where_measured():
    head, x = _head(), _clean()
    assert supports_fused(head, x)
    assert supports_fused(head.eval(), x)
    head.train()
    assert not supports_fused(head, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not supports_fused(head, x)
    assert not supports_fused(nn.Sequential(*list(head)[:3], nn.Conv2d(H, 2, 1)), x)
    assert not supports_fused(nn.Sequential(head[0], nn.ReLU(), head[2], head[3]), x)
    no_stats = copy.deepcopy(head)
    no_stats[1].track_running_stats = False
    assert not supports_fused(no_stats, x)
    no_stats[1].running_mean = no_stats[1].running_var = None
    assert not supports_fused(no_stats.eval(), x)  # eval with batch statistics: the modules

"""Fast forwards for the per-position MLP head ``1x1 conv -> BatchNorm -> LeakyReLU -> 1x1 conv``.

SuperSimpleNet's segmentation head is this MLP applied at every feature-map position: ``[M, C]`` rows (M = batch x positions, C ~ 150) to a ``[M, H]`` hidden layer
(H = 1024) and back to one logit per row. In training mode the plain modules make about a dozen
full passes over the ``[M, H]`` tensor besides the two matrix products (batch-norm statistics,
normalisation, activation, and their backward passes), and at a 64x64 map those passes cost as
much as the arithmetic on a CPU (benchmarks/results/ssn_profile.md).

:func:`bn_mlp_train_forward` computes the same function with fewer passes:

* Batch norm in training mode normalises ``z = W x + b`` with its batch mean and (biased)
  variance. Both follow from the input's: ``mean(z) = W mean(x) + b`` and
  ``var(z)_j = w_j^T cov(x) w_j``, where ``cov(x)`` is only ``C x C``. So the normalisation folds
  into the first layer's weights, ``W' = diag(gamma / sqrt(var(z) + eps)) W``, with
  ``b' = beta - diag(...) W mean(x)``; autograd differentiates through the statistics exactly as
  through batch norm's own. The running statistics are updated as :class:`torch.nn.BatchNorm2d`
  updates them.
* The remaining ``leaky_relu(x W'^T + b') w2`` runs in blocks of rows that stay in cache, forward
  and backward (:class:`_LeakyMLP`), and keeps only the activations for the backward pass.
* :func:`bn_mlp_train_forward_copies`: SuperSimpleNet's stacked noisy copies of one batch share
  the product with the clean features (:class:`_LeakyMLPCopies`).
* :func:`bn_mlp_eval_forward`: in eval mode the batch norm is a fixed affine map, folded the same
  way, and the hidden layer is computed a block at a time, never whole.

The result equals the modules' output to float round-off (tests/models/test_fused_head.py).
"""

from __future__ import annotations

import torch
from torch import nn

# Rows per block: a [1024, 1024] float32 block (4 MiB) stays in a CPU's cache between the matrix
# product, the activation and the projection that use it.
BLOCK_ROWS = 1024


class _LeakyMLP(torch.autograd.Function):
    """``x [M,C], weight [H,C], bias [H], proj [H] -> leaky_relu(x weight^T + bias, slope) proj  [M]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, proj, slope: float, block: int):
        rows = x.shape[0]
        hidden = x.new_empty(rows, weight.shape[0])
        out = x.new_empty(rows)
        weight_t = weight.t()
        for start in range(0, rows, block):
            part = slice(start, start + block)
            h = hidden[part]
            torch.addmm(bias, x[part], weight_t, out=h)
            torch.nn.functional.leaky_relu_(h, slope)
            torch.mv(h, proj, out=out[part])
        ctx.save_for_backward(x, weight, proj, hidden)
        ctx.slope, ctx.block = slope, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, proj, hidden = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros_like(weight)
        grad_bias = weight.new_zeros(weight.shape[0])
        grad_proj = torch.zeros_like(proj)
        for start in range(0, x.shape[0], ctx.block):
            part = slice(start, start + ctx.block)
            h, g = hidden[part], grad_out[part]
            grad_proj.addmv_(h.t(), g)
            # d loss / d pre-activation: the outer product through the activation's slope
            # (recovered from the activation itself: same sign as its input).
            grad_z = torch.ops.aten.leaky_relu_backward(torch.outer(g, proj), h, ctx.slope, True)
            grad_weight.addmm_(grad_z.t(), x[part])
            grad_bias.add_(grad_z.sum(dim=0))
            if need_x:
                torch.mm(grad_z, weight, out=grad_x[part])
        return grad_x, grad_weight, grad_bias, grad_proj, None, None


def supports_fused(head: nn.Sequential, features: torch.Tensor) -> bool:
    """Whether the fused forwards apply to ``head`` and ``features``: the expected layers, a
    float32 CPU tensor, no autocast, compiler or tracer (elsewhere the plain modules run; the
    fused paths' gain is measured on CPU only). In training mode the batch norm must keep
    running statistics with a momentum; in eval mode it must have running statistics."""
    if len(head) != 4:
        return False
    conv1, bn, act, conv2 = head
    if not (
        isinstance(conv1, nn.Conv2d)
        and conv1.kernel_size == (1, 1)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and isinstance(act, nn.LeakyReLU)
        and isinstance(conv2, nn.Conv2d)
        and conv2.kernel_size == (1, 1)
        and conv2.out_channels == 1
        and features.device.type == "cpu"
        and features.dtype == torch.float32
        and conv1.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        # The compiler fuses the plain modules itself; a tracer must see them.
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    ):
        return False
    if bn.training:
        return bn.track_running_stats and bn.momentum is not None
    return bn.running_mean is not None and bn.running_var is not None


def _rows(features: torch.Tensor) -> torch.Tensor:
    """``[B,C,h,w]`` -> NHWC rows ``[B*h*w, C]``; a view when the features are channels-last (the
    models keep them so)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _fold(conv1: nn.Conv2d, bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[H,C]`` and bias ``[H]`` of ``bn(conv1(x))`` as one affine map, for a batch norm that
    normalises with ``mean`` and ``var`` (of ``z = W x + b``, per hidden channel)."""
    weight = conv1.weight.reshape(conv1.out_channels, -1)
    scale = bn.weight * torch.rsqrt(var + bn.eps)
    # With the conv bias written out (it cancels against the one inside ``mean``) so that in
    # training it gets its zero gradient as with the modules: a parameter left out of the
    # graph would stop DistributedDataParallel.
    shift = mean if conv1.bias is None else mean - conv1.bias
    return weight * scale[:, None], bn.bias - scale * shift


def _fold_batch_statistics(
    conv1: nn.Conv2d, bn: nn.BatchNorm2d, mean: torch.Tensor, cov: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fold` for training mode, from the mean ``[C]`` and (biased) covariance ``[C,C]`` of
    ``count`` input rows; updates the running statistics as batch norm does."""
    weight = conv1.weight.reshape(conv1.out_channels, -1)
    # Batch statistics of z = W x + b: mean W mean(x) + b, variance w_j^T cov(x) w_j.
    batch_mean = weight @ mean if conv1.bias is None else weight @ mean + conv1.bias
    var = ((weight @ cov) * weight).sum(dim=1)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        bn.running_mean.lerp_(batch_mean, bn.momentum)
        bn.running_var.lerp_(var * (count / max(count - 1, 1)), bn.momentum)
    return _fold(conv1, bn, batch_mean, var)


def _to_map(out: torch.Tensor, conv2: nn.Conv2d, batch: int, h: int, w: int) -> torch.Tensor:
    """Per-row logits ``[batch*h*w]`` -> ``[batch,1,h,w]``, with the projection's bias if any."""
    if conv2.bias is not None:
        out = out + conv2.bias
    return out.reshape(batch, h, w, 1).permute(0, 3, 1, 2)


def bn_mlp_eval_forward(head: nn.Sequential, features: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """Eval-mode forward of ``head`` (see :func:`bn_mlp_train_forward`) on ``features [B,C,h,w]`` ->
    logits ``[B,1,h,w]``: the batch norm's fixed affine map folded into the first layer, and the
    hidden layer computed one row block at a time, so it never exists whole (at a 64x64 map and
    batch 32 it would take 512 MiB). Differentiable when gradients are on."""
    conv1, bn, act, conv2 = head
    b, _, h, w = features.shape
    rows = _rows(features)
    folded_weight, folded_bias = _fold(conv1, bn, bn.running_mean, bn.running_var)
    proj = conv2.weight.reshape(-1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, folded_weight, folded_bias, proj)):
        out = _LeakyMLP.apply(rows, folded_weight, folded_bias, proj, act.negative_slope, block)
    else:
        out = rows.new_empty(rows.shape[0])
        buffer = rows.new_empty(min(block, rows.shape[0]), conv1.out_channels)
        weight_t = folded_weight.t()
        for start in range(0, rows.shape[0], block):
            part = slice(start, start + block)
            hidden = buffer[: len(out[part])]
            torch.addmm(folded_bias, rows[part], weight_t, out=hidden)
            torch.nn.functional.leaky_relu_(hidden, act.negative_slope)
            torch.mv(hidden, proj, out=out[part])
    return _to_map(out, conv2, b, h, w)


def bn_mlp_forward(head: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` through the fused forward of the head's mode where it applies
    (:func:`supports_fused`), else through the modules."""
    if not supports_fused(head, features):
        return head(features)
    if head[1].training:
        return bn_mlp_train_forward(head, features)
    return bn_mlp_eval_forward(head, features)


def bn_mlp_train_forward(head: nn.Sequential, features: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """Training-mode forward of ``head`` (Conv2d 1x1 -> BatchNorm2d -> LeakyReLU -> Conv2d 1x1 to
    one channel) on ``features [B,C,h,w]`` -> logits ``[B,1,h,w]``, as ``head(features)`` gives,
    including the update of the batch norm's running statistics. Check :func:`supports_fused` first
    (or call :func:`bn_mlp_forward`).
    """
    conv1, bn, act, conv2 = head
    b, _, h, w = features.shape
    rows = _rows(features)
    mean = rows.mean(dim=0)
    centered = rows - mean
    cov = centered.t() @ centered / rows.shape[0]
    folded_weight, folded_bias = _fold_batch_statistics(conv1, bn, mean, cov, rows.shape[0])
    out = _LeakyMLP.apply(rows, folded_weight, folded_bias, conv2.weight.reshape(-1), act.negative_slope, block)
    return _to_map(out, conv2, b, h, w)


class _LeakyMLPCopies(torch.autograd.Function):
    """:class:`_LeakyMLP` on ``copies`` stacked copies of ``clean [N,C]`` rows with sparse
    additions: row ``r`` of the stacked ``[copies*N, C]`` input is ``clean[r % N]`` plus
    ``noise[j]`` where ``index[j] == r`` (``index`` sorted, unique). Returns ``[copies*N]``.

    By linearity ``(clean + noise) W^T = clean W^T + noise W^T``, so the product with ``clean`` is
    computed once for all copies and the noise only at its own rows; in the backward pass the
    copies' gradients are summed before the products with ``clean``. Where most rows carry no
    noise (SuperSimpleNet: 13 % do) that is ~40 % fewer multiply-adds than on the stacked input.
    The noise gets no gradient.
    """

    @staticmethod
    def forward(ctx, clean, noise, index, weight, bias, proj, slope: float, block: int, copies: int):
        rows = clean.shape[0]
        hidden = clean.new_empty(copies * rows, weight.shape[0])
        out = clean.new_empty(copies * rows)
        weight_t = weight.t()
        starts = torch.arange(0, rows, block, device=index.device)
        # Where each (copy, block)'s noisy rows begin and end in ``index``.
        edges = torch.cat([starts + c * rows for c in range(copies)] + [index.new_tensor([copies * rows])])
        bounds = torch.searchsorted(index, edges).tolist()
        nblocks = len(starts)
        for b, start in enumerate(range(0, rows, block)):
            stop = min(start + block, rows)
            first = hidden[start:stop]
            torch.addmm(bias, clean[start:stop], weight_t, out=first)
            for c in range(1, copies):
                hidden[c * rows + start : c * rows + stop].copy_(first)
            for c in range(copies):
                offset = c * rows
                h = hidden[offset + start : offset + stop]
                lo, hi = bounds[c * nblocks + b], bounds[c * nblocks + b + 1]
                if hi > lo:
                    h.index_add_(0, index[lo:hi] - (offset + start), noise[lo:hi] @ weight_t)
                torch.nn.functional.leaky_relu_(h, slope)
                torch.mv(h, proj, out=out[offset + start : offset + stop])
        ctx.save_for_backward(clean, noise, index, weight, proj, hidden)
        ctx.slope, ctx.block, ctx.copies, ctx.bounds = slope, block, copies, bounds
        return out

    @staticmethod
    def backward(ctx, grad_out):
        clean, noise, index, weight, proj, hidden = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        rows, copies, block, bounds = clean.shape[0], ctx.copies, ctx.block, ctx.bounds
        nblocks = (rows + block - 1) // block
        need_clean = ctx.needs_input_grad[0]
        grad_clean = torch.empty_like(clean) if need_clean else None
        grad_weight = torch.zeros_like(weight)
        grad_bias = weight.new_zeros(weight.shape[0])
        grad_proj = torch.zeros_like(proj)
        for b, start in enumerate(range(0, rows, block)):
            stop = min(start + block, rows)
            grad_sum = None
            for c in range(copies):
                offset = c * rows
                h, g = hidden[offset + start : offset + stop], grad_out[offset + start : offset + stop]
                grad_proj.addmv_(h.t(), g)
                grad_z = torch.ops.aten.leaky_relu_backward(torch.outer(g, proj), h, ctx.slope, True)
                lo, hi = bounds[c * nblocks + b], bounds[c * nblocks + b + 1]
                if hi > lo:
                    grad_weight.addmm_(grad_z[index[lo:hi] - (offset + start)].t(), noise[lo:hi])
                grad_sum = grad_z if grad_sum is None else grad_sum.add_(grad_z)
            grad_weight.addmm_(grad_sum.t(), clean[start:stop])
            grad_bias.add_(grad_sum.sum(dim=0))
            if need_clean:
                torch.mm(grad_sum, weight, out=grad_clean[start:stop])
        return grad_clean, None, None, grad_weight, grad_bias, grad_proj, None, None, None


def bn_mlp_train_forward_copies(
    head: nn.Sequential,
    clean: torch.Tensor,
    noise_rows: torch.Tensor,
    noise_index: torch.Tensor,
    copies: int = 2,
    block: int = BLOCK_ROWS,
) -> torch.Tensor:
    """``head``'s training forward on ``copies`` stacked copies of ``clean [B,C,h,w]`` with sparse
    noise -> logits ``[copies*B,1,h,w]``.

    Equals ``head(clean.repeat(copies, 1, 1, 1) + noise)`` where ``noise`` is zero except at the
    positions ``noise_index`` (indices into the stacked ``copies*B*h*w`` positions in
    batch, row, column order; sorted, unique), whose channel vectors are ``noise_rows [K,C]``
    (:func:`scatter_rows` builds that dense ``noise``). Needs :func:`supports_fused`.
    """
    conv1, bn, act, conv2 = head
    b, _, h, w = clean.shape
    rows = _rows(clean)
    n = rows.shape[0]
    total = copies * n
    # Mean and covariance of the stacked rows from the clean rows and the noisy ones alone;
    # about the clean mean (a constant shift) so the sums do not cancel badly.
    shift = rows.detach().mean(dim=0)
    clean_c = rows - shift
    noisy_clean_c = clean_c[noise_index % n]
    noisy_c = noisy_clean_c + noise_rows
    first = (copies * clean_c.sum(dim=0) + noise_rows.sum(dim=0)) / total
    gram = copies * (clean_c.t() @ clean_c) + noisy_c.t() @ noisy_c - noisy_clean_c.t() @ noisy_clean_c
    cov = gram / total - first[:, None] * first[None, :]
    folded_weight, folded_bias = _fold_batch_statistics(conv1, bn, shift + first, cov, total)
    out = _LeakyMLPCopies.apply(
        rows, noise_rows.detach(), noise_index, folded_weight, folded_bias, conv2.weight.reshape(-1),
        act.negative_slope, block, copies,
    )
    return _to_map(out, conv2, copies * b, h, w)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Dense channels-last ``[B,C,h,w]`` tensor, zero except ``rows [K,C]`` at the positions
    ``index`` (into the ``B*h*w`` positions in batch, row, column order)."""
    b, c, h, w = shape
    dense = rows.new_zeros(b * h * w, c)
    dense[index] = rows
    return dense.reshape(b, h, w, c).permute(0, 3, 1, 2)

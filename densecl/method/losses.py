"""InfoNCE against a queue of negatives: MoCo v2's global loss and, per grid cell, DenseCL's dense loss."""

from __future__ import annotations

import math

import torch

# With L2-normalised inputs every logit lies in [-1/tau, 1/tau], so exp cannot overflow in fp32 as long as
# 1/tau stays well below log(max float) ~ 88: the usual max-subtraction pass over the logits is then skipped.
MAX_UNSHIFTED_LOGIT = 60.0


def amp_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The dtype of the loss's GEMMs under mixed precision, None for full precision.

    A bf16 query (fp16: CUDA only, as pretrain.amp allows), or an fp32 query inside torch.autocast on its device
    (the model normalises in fp32 under autocast). fp32 outside autocast and fp64 (tests) keep full precision.
    """
    low = (torch.bfloat16, torch.float16) if query.is_cuda else (torch.bfloat16,)
    if query.dtype in low:
        return query.dtype
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype if dtype in low else None
    return None


def max_unshifted_logit(dtype: torch.dtype) -> float:
    """Largest 1/tau for which exp(logit) is stored without the max shift: fp16 holds only exp(11)."""
    return min(MAX_UNSHIFTED_LOGIT, math.log(torch.finfo(dtype).max) - 1.0)


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b accumulated in fp32 and returned in `out_dtype`: straight from cuBLAS on CUDA (an fp16 output of a
    K-term sum of exps could overflow), else rounded to a's dtype first (bf16 has fp32's range)."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except TypeError:  # an older torch build without mm's out_dtype: the fp32 product, rounded below
            pass
    return torch.mm(a, b).to(out_dtype)


class _QueueInfoNCE(torch.autograd.Function):
    """Mean over rows of -log softmax([q.k+, q.queue] / tau)[0], gradient for q only.

    The gradient is formed in the forward pass, while the (M, K) logit matrix is hot in cache and before
    anything else touches the queue. That keeps a single (M, K) buffer alive instead of autograd's three,
    touched only by the two GEMMs, one in-place exp and one row sum (1/tau and the softmax normaliser are
    applied to the (M, D) operands instead), and lets the model enqueue new keys into the same queue right
    after the loss without cloning it (for the dense loss M = N * S^2 rows, K = 65536).

    Mixed precision (`amp_dtype`: bf16, or fp16 on CUDA), to run both GEMMs on the AMP units: q/tau @ queue and
    exp(logits) @ queue.T take AMP-dtype operands and accumulate in fp32 (cuBLAS / oneDNN); what has M or
    (M, D) elements (positive logits, shift, row sums, log, gradient scaling) stays fp32, as autocast runs
    MoCo's einsum in bf16 and its cross-entropy in fp32. It allocates one (M, K) buffer in the AMP dtype (the
    logits, then their exps in place: half of fp32's bytes), one AMP copy of the (D, K) queue for both GEMMs,
    and (M, D) operands. Why it is safe: q and the keys are L2-normalised, so every logit lies in
    [-1/tau, 1/tau] and exp(1/tau) is far from overflow (fp16 takes the max shift above 1/tau = 10). Rounding
    the operands and the stored logit moves a logit by a few 2^-9/tau at most (bf16; ~0.01 at tau = 0.2),
    ~1% on each exp, unbiased over K terms. The exps are evaluated in fp32 and stored in the AMP dtype (the
    second GEMM's input), a further move of <= 2^-9; they are summed and logged in fp32, and the gradient uses
    the same stored values over that sum: loss and gradient are those of one fp32 softmax of slightly moved
    logits. Coarse only for tiny temperatures (bf16's spacing is 0.5 at logits near 1/tau = 100). Full
    precision (fp32 outside autocast, fp64) computes in that dtype throughout, with autocast off inside.
    """

    @staticmethod
    def forward(ctx, query, positive, queue, temperature):
        gemm_dtype = amp_dtype(query)
        with torch.autocast(query.device.type, enabled=False):  # the casts are this function's own
            loss, grad = _loss_and_grad(query, positive, queue, temperature, gemm_dtype, ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad.to(query.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def _loss_and_grad(query, positive, queue, temperature, gemm_dtype, needs_grad):
    dtype = torch.promote_types(query.dtype, torch.float32)  # the softmax's: fp32, fp64 in tests
    gemm_dtype = gemm_dtype or dtype
    q = query.to(dtype) / temperature
    k, bank = positive.to(dtype), queue.to(gemm_dtype)
    pos = (q * k).sum(dim=1)  # (M,)
    neg = torch.mm(q.to(gemm_dtype), bank)  # (M, K) logits, the one (M, K) buffer
    if 1.0 / temperature <= max_unshifted_logit(gemm_dtype):
        shift = torch.zeros_like(pos)
    else:
        shift = torch.maximum(neg.amax(dim=1).to(dtype), pos)
        neg.sub_(shift[:, None])
    neg.exp_()
    pos_exp = (pos - shift).exp()
    total = neg.sum(dim=1, dtype=dtype) + pos_exp
    loss = (total.log() + shift - pos).mean()
    if not needs_grad:
        return loss, None
    rows = q.shape[0]
    # d loss_i / d q_i = (p_pos_i k_i + sum_j p_ij queue_j - k_i) / tau, averaged over the M rows
    scale = 1.0 / (total * temperature * rows)
    grad = _mm(neg, bank.t(), dtype).mul_(scale[:, None])
    grad.add_(k * ((pos_exp / total - 1.0) / (temperature * rows))[:, None])
    return loss, grad


def info_nce(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """query, positive: (M, D), L2-normalised; queue: (D, K), L2-normalised columns (receives no gradient)."""
    return _QueueInfoNCE.apply(query, positive.detach(), queue.detach(), temperature)


def dense_info_nce(
    query_grid: torch.Tensor, positive_grid: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """DenseCL's L_r: query_grid / positive_grid (N, D, P) matched cell by cell, mean over the N * P cells."""
    dim = query_grid.shape[1]
    return info_nce(
        query_grid.transpose(1, 2).reshape(-1, dim),
        positive_grid.transpose(1, 2).reshape(-1, dim),
        queue,
        temperature,
    )

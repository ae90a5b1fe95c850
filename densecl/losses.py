"""InfoNCE against a queue of negatives: MoCo v2's global loss and, per grid cell, DenseCL's dense loss."""

from __future__ import annotations

import torch

# With L2-normalised inputs every logit lies in [-1/tau, 1/tau], so exp cannot overflow in fp32 as long as
# 1/tau stays well below log(max float) ~ 88: the usual max-subtraction pass over the logits is then skipped.
MAX_UNSHIFTED_LOGIT = 60.0


class _QueueInfoNCE(torch.autograd.Function):
    """Mean over rows of -log softmax([q.k+, q.queue] / tau)[0], gradient for q only.

    The gradient is formed in the forward pass, while the (M, K) logit matrix is hot in cache and before
    anything else touches the queue. That keeps a single (M, K) buffer alive instead of autograd's three,
    touched only by the two GEMMs, one in-place exp and one row sum (1/tau and the softmax normaliser are
    applied to the (M, D) operands instead), and lets the model enqueue new keys into the same queue right
    after the loss without cloning it (for the dense loss M = N * S^2 rows, K = 65536).
    """

    @staticmethod
    def forward(ctx, query, positive, queue, temperature):
        dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 under autocast, fp64 in tests
        q = query.to(dtype) / temperature
        k, bank = positive.to(dtype), queue.to(dtype)
        pos = (q * k).sum(dim=1)  # (M,)
        neg = torch.mm(q, bank)  # (M, K) logits
        if 1.0 / temperature <= MAX_UNSHIFTED_LOGIT:
            shift = torch.zeros_like(pos)
        else:
            shift = torch.maximum(neg.amax(dim=1), pos)
            neg.sub_(shift[:, None])
        neg.exp_()
        pos_exp = (pos - shift).exp()
        total = neg.sum(dim=1) + pos_exp
        loss = (total.log() + shift - pos).mean()
        if ctx.needs_input_grad[0]:
            rows = q.shape[0]
            # d loss_i / d q_i = (p_pos_i k_i + sum_j p_ij queue_j - k_i) / tau, averaged over the M rows
            scale = 1.0 / (total * temperature * rows)
            grad = torch.mm(neg, bank.t()).mul_(scale[:, None])
            grad.add_(k * ((pos_exp / total - 1.0) / (temperature * rows))[:, None])
            ctx.save_for_backward(grad.to(query.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


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

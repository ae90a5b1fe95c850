"""The losses against slow, obviously-correct per-row / per-position loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from densecl.losses import dense_info_nce, info_nce


def unit(*shape, dim):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=dim)


def slow_info_nce_row(q, k_pos, queue, tau):
    pos = math.exp(float(q @ k_pos) / tau)
    negs = sum(math.exp(float(q @ queue[:, j]) / tau) for j in range(queue.shape[1]))
    return -math.log(pos / (pos + negs))


@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_info_nce_matches_per_row_loop(tau):
    torch.manual_seed(0)
    q, k, queue = unit(6, 16, dim=1), unit(6, 16, dim=1), unit(16, 40, dim=0)
    expected = sum(slow_info_nce_row(q[i], k[i], queue, tau) for i in range(6)) / 6
    assert info_nce(q, k, queue, tau).item() == pytest.approx(expected, rel=1e-10)


def test_info_nce_gradient_matches_autograd_of_cross_entropy():
    torch.manual_seed(1)
    q, k, queue = unit(5, 8, dim=1).requires_grad_(), unit(5, 8, dim=1), unit(8, 30, dim=0)
    (3.0 * info_nce(q, k, queue, 0.2)).backward()
    q_ref = q.detach().clone().requires_grad_()
    logits = torch.cat([(q_ref * k).sum(1, keepdim=True), q_ref @ queue], dim=1) / 0.2
    (3.0 * F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))).backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: info_nce(x, k, queue, 0.2), (q.detach().requires_grad_(),))


def test_info_nce_gives_no_gradient_to_keys_or_queue():
    q, k, queue = unit(3, 8, dim=1).requires_grad_(), unit(3, 8, dim=1).requires_grad_(), unit(8, 12, dim=0)
    info_nce(q, k, queue, 0.2).backward()
    assert k.grad is None and q.grad is not None


def test_info_nce_is_unaffected_by_a_queue_update_after_the_forward():
    """The model enqueues right after the loss; the gradient must still be the one of the old queue."""
    torch.manual_seed(2)
    q, k, queue = unit(4, 8, dim=1).requires_grad_(), unit(4, 8, dim=1), unit(8, 16, dim=0)
    loss = info_nce(q, k, queue, 0.2)
    expected = torch.autograd.grad(info_nce(q, k, queue.clone(), 0.2), q)[0]
    queue[:, :4] = unit(8, 4, dim=0)
    loss.backward()
    torch.testing.assert_close(q.grad, expected)


def test_dense_info_nce_matches_per_position_loop():
    torch.manual_seed(3)
    n, d, p, tau = 3, 8, 9, 0.2
    r, t, queue = unit(n, d, p, dim=1), unit(n, d, p, dim=1), unit(d, 20, dim=0)
    # the paper's L_r: (1/S^2) sum over positions, averaged over the batch
    expected = sum(slow_info_nce_row(r[i, :, s], t[i, :, s], queue, tau) for i in range(n) for s in range(p)) / (n * p)
    assert dense_info_nce(r, t, queue, tau).item() == pytest.approx(expected, rel=1e-10)


def test_dense_info_nce_gradient_matches_autograd_reference():
    torch.manual_seed(4)
    r = unit(2, 8, 4, dim=1).requires_grad_()
    t, queue = unit(2, 8, 4, dim=1), unit(8, 10, dim=0)
    dense_info_nce(r, t, queue, 0.2).backward()
    r_ref = r.detach().clone().requires_grad_()
    rows = r_ref.permute(0, 2, 1).reshape(-1, 8)
    pos = (rows * t.permute(0, 2, 1).reshape(-1, 8)).sum(1, keepdim=True)
    F.cross_entropy(torch.cat([pos, rows @ queue], 1) / 0.2, torch.zeros(8, dtype=torch.long)).backward()
    torch.testing.assert_close(r.grad, r_ref.grad)


def test_info_nce_small_temperature_takes_the_shifted_path_and_stays_exact():
    torch.manual_seed(5)
    tau = 0.01  # logits up to 100: exp would overflow fp32 without the max shift
    q, k, queue = (F.normalize(torch.randn(*s), dim=d) for s, d in (((4, 8), 1), ((4, 8), 1), ((8, 20), 0)))
    q.requires_grad_()
    loss = info_nce(q, k, queue, tau)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / tau
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(expected, q)[0])

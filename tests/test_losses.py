"""The losses against slow, obviously-correct per-row / per-position loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from densecl.method.losses import dense_info_nce, info_nce


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


# ---------------------------------------------------------------------------------------- mixed precision

BF16 = torch.bfloat16


def amp_inputs(rows, dim, keys, seed):
    """fp32 unit query rows, positives near them (a loss well below log K), a unit-column queue."""
    torch.manual_seed(seed)
    q = F.normalize(torch.randn(rows, dim), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(rows, dim) / dim**0.5, dim=1)
    return q, k, F.normalize(torch.randn(dim, keys), dim=0)


def loss_and_grad(fn, q, *args, autocast=False):
    q = q.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = fn(q, *args)
    loss.backward()
    return loss.detach(), q.grad


def fp64_reference(q, k, queue, tau):
    """Plain autograd cross-entropy over [q.k, q.queue] / tau in float64."""
    q = q.detach().double().requires_grad_()
    logits = torch.cat([(q * k.double()).sum(1, keepdim=True), q @ queue.double()], 1) / tau
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    loss.backward()
    return loss.detach(), q.grad


def bf16_gemm_emulation(q, k, queue, tau):
    """What the AMP path promises, in float64: bf16 operands (q/tau, the queue), products accumulated exactly and
    the logits stored in bf16, their exps stored in bf16 (the second GEMM's input), everything else exact:
    positives, row sums, log, and the gradient from those stored exps (the CPU stores the (M, D) GEMM in bf16)."""
    q, k, rows = q.double(), k.double(), q.shape[0]
    bank = queue.to(BF16).double()
    exps = ((q.float() / tau).to(BF16).double() @ bank).to(BF16).double().exp().to(BF16).double()
    pos = (q * k).sum(1) / tau
    total = exps.sum(1) + pos.exp()
    loss = (total.log() - pos).mean()
    grad = ((exps @ bank.T).to(BF16).double() / total[:, None] + k * (pos.exp() / total - 1)[:, None]) / (tau * rows)
    return loss, grad


def todays_fp32_info_nce(q, k, queue, tau):
    """The full-precision computation before mixed precision had its own path, op for op (unshifted)."""
    q = q / tau
    pos = (q * k).sum(dim=1)
    neg = torch.mm(q, queue).exp_()
    pos_exp = pos.exp()
    total = neg.sum(dim=1) + pos_exp
    rows = q.shape[0]
    grad = torch.mm(neg, queue.t()).mul_((1.0 / (total * tau * rows))[:, None])
    grad.add_(k * ((pos_exp / total - 1.0) / (tau * rows))[:, None])
    return total.log().sub(pos).mean(), grad


@pytest.mark.parametrize("tau", [0.2, 0.07])
@pytest.mark.parametrize("how", ["autocast", "bf16 query"])
def test_amp_info_nce_matches_the_fp64_reference_within_bf16_tolerance(how, tau):
    q, k, queue = amp_inputs(64, 32, 512, seed=6)
    if how == "autocast":  # the model's case: an fp32 query, normalised in fp32, inside torch.autocast
        loss, grad = loss_and_grad(info_nce, q, k, queue, tau, autocast=True)
    else:
        q = q.to(BF16)
        loss, grad = loss_and_grad(info_nce, q, k, queue, tau)
        assert grad.dtype == BF16
    ref_loss, ref_grad = fp64_reference(q, k, queue, tau)
    assert loss.dtype == torch.float32
    # measured: |loss error| < 3e-4 (loss ~ 3-6), gradient error < 4e-3 of its largest entry
    assert loss.item() == pytest.approx(ref_loss.item(), abs=2e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1.5e-2 * ref_grad.abs().max().item())


def test_amp_dense_info_nce_matches_the_per_position_loop_and_autograd():
    torch.manual_seed(7)
    n, d, p, tau = 4, 32, 9, 0.2
    t = F.normalize(torch.randn(n, d, p), dim=1)
    r = F.normalize(t + 0.5 * torch.randn(n, d, p) / d**0.5, dim=1)
    queue = F.normalize(torch.randn(d, 256), dim=0)
    loss, grad = loss_and_grad(dense_info_nce, r, t, queue, tau, autocast=True)
    r64, t64, queue64 = r.double(), t.double(), queue.double()
    expected = sum(slow_info_nce_row(r64[i, :, s], t64[i, :, s], queue64, tau) for i in range(n) for s in range(p))
    assert loss.item() == pytest.approx(expected / (n * p), abs=2e-3)
    rows = r.transpose(1, 2).reshape(-1, d)
    _, ref_grad = fp64_reference(rows, t.transpose(1, 2).reshape(-1, d), queue, tau)
    ref_grad = ref_grad.reshape(n, p, d).transpose(1, 2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1.5e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_amp_path_runs_the_gemms_in_bf16_and_the_softmax_in_fp32(tau):
    """Equal to the float64 emulation of bf16 GEMMs + exact softmax up to fp32 rounding, while the fp32 path is
    measurably off it: the GEMMs really run in bf16; a softmax normaliser rounded to bf16 would be off by ~1e-4."""
    q, k, queue = amp_inputs(8, 32, 512, seed=8)
    loss, grad = loss_and_grad(info_nce, q, k, queue, tau, autocast=True)
    emulated_loss, emulated_grad = bf16_gemm_emulation(q, k, queue, tau)
    scale = emulated_grad.abs().max().item()
    # measured over seeds: loss within 3e-7 (1 ulp), gradient within 3e-6 of its largest entry
    assert abs(loss.item() - emulated_loss.item()) < 2e-6
    torch.testing.assert_close(grad.double(), emulated_grad, rtol=0, atol=2e-5 * scale)
    _, fp32_grad = loss_and_grad(info_nce, q, k, queue, tau)
    assert (fp32_grad.double() - emulated_grad).abs().max() > 1e-4 * scale  # measured: 2.6e-4 .. 1.7e-2


def test_amp_small_temperature_takes_the_shifted_path_and_stays_finite():
    """Logits up to 1/tau = 100, where bf16's spacing is 0.5: coarse (measured: loss within 2.5e-4 relative,
    gradient within 5% of its largest entry), but finite and unbiased enough to train."""
    q, _, queue = amp_inputs(64, 32, 512, seed=11)
    k = F.normalize(torch.randn(64, 32), dim=1)
    loss, grad = loss_and_grad(info_nce, q, k, queue, 0.01, autocast=True)
    ref_loss, ref_grad = fp64_reference(q, k, queue, 0.01)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=0.1 * ref_grad.abs().max().item())


def record_mm(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    seen, original = [], torch.mm

    def recording_mm(a, b, **kwargs):
        seen.append((a.dtype, b.dtype))
        return original(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    return seen


@pytest.mark.parametrize(
    "dtype, autocast, expected",
    [(torch.float32, True, BF16), (BF16, False, BF16), (torch.float32, False, torch.float32),
     (torch.float64, True, torch.float64), (torch.float16, False, torch.float32)],  # fp16 AMP is CUDA's only
)
def test_the_gemm_dtype_follows_autocast_and_the_query(monkeypatch, dtype, autocast, expected):
    seen = record_mm(monkeypatch)
    q, k, queue = amp_inputs(4, 16, 32, seed=9)
    loss_and_grad(info_nce, q.to(dtype), k.to(dtype), queue.to(dtype), 0.2, autocast=autocast)
    assert seen == [(expected, expected)] * 2  # logits, then the gradient's probabilities @ queue.T


@pytest.mark.parametrize("shape", [(6, 16, 40), (72, 128, 4096)])
def test_fp32_outside_autocast_is_computed_exactly_as_before(shape):
    rows, dim, keys = shape
    q, k, queue = amp_inputs(rows, dim, keys, seed=10)
    loss, grad = loss_and_grad(info_nce, q, k, queue, 0.2)
    before_loss, before_grad = todays_fp32_info_nce(q, k, queue, 0.2)
    assert torch.equal(loss, before_loss) and torch.equal(grad, before_grad)

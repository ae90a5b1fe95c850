"""The DenseCL builder: encoders, momentum, queues, regions, matching inside the model, MoCo v2 as lambda = 0."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from densecl.method.model import DenseCL
from densecl.method.settings import BackboneConfig, MatchingConfig, ModelConfig
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.typed_settings import ConfigValueError


def full_boxes(n, size):
    return torch.tensor([0.0, 0.0, size, size]).expand(n, 2, 4).clone()


def no_flips(n):
    return torch.zeros(n, 2, dtype=torch.bool)


def tiny(**kwargs):
    torch.manual_seed(0)
    defaults = dict(arch="resnet18", queue_len=16)
    defaults.update(kwargs)
    return DenseCL(**defaults)


def test_heads_adapt_to_backbone_channels():
    m18 = tiny()
    assert m18.encoder_q.global_head.mlp[0].in_features == 512
    assert m18.encoder_q.dense_head.convs[0].in_channels == 512
    assert m18.encoder_q.global_head.mlp[2].out_features == 128
    m50 = tiny(arch="resnet50")
    assert m50.encoder_q.dense_head.convs[0].in_channels == 2048
    assert m50.encoder_q.dense_head.convs[2].out_channels == 128


def test_key_encoder_starts_as_copy_without_grad():
    m = tiny()
    for (name, pq), pk in zip(m.encoder_q.named_parameters(), m.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk), name
        assert not pk.requires_grad


def test_momentum_formula():
    m = tiny(momentum=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_q = [p.detach().clone() for p in m.encoder_q.parameters()]
    before_k = [p.detach().clone() for p in m.encoder_k.parameters()]
    m.momentum_update()
    for q, k, new in zip(before_q, before_k, m.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * k + 0.1 * q)


def test_no_gradient_reaches_key_encoder_and_queues():
    m = tiny()
    x = torch.randn(4, 3, 64, 64)
    out = m(x, torch.randn(4, 3, 64, 64), full_boxes(4, 64), no_flips(4))
    out["loss"].backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert all(p.grad is not None for p in m.encoder_q.parameters())
    assert not m.queue_global.requires_grad and not m.queue_dense.requires_grad


def test_queue_wraps_around():
    m = tiny(queue_len=8)
    keys = [F.normalize(torch.randn(4, 128), dim=1) for _ in range(3)]
    for k in keys:
        m._enqueue(m.queue_global, m.queue_global_ptr, k)
    # 3 batches of 4 into a queue of 8: the third overwrote the first
    assert int(m.queue_global_ptr) == 4
    torch.testing.assert_close(m.queue_global[:, :4], keys[2].T)
    torch.testing.assert_close(m.queue_global[:, 4:], keys[1].T)


def test_queue_length_must_be_divisible_by_the_global_batch():
    cfg = PretrainConfig(pretrain=TrainingConfig(queue_len=10, batch_size=4))
    with pytest.raises(ConfigValueError, match="pretrain.queue_len=10 is invalid: must be divisible by the global "
                       r"batch 8 \(pretrain.batch_size=4 x 2 processes\)"):
        cfg.validate(world_size=2)


def test_queues_receive_normalised_keys_and_pooled_dense_vectors():
    m = tiny()
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    m(im_q, im_k, full_boxes(4, 64), no_flips(4))
    # recompute the keys with the (already updated) key encoder: train-mode BN uses batch statistics
    with torch.no_grad():
        k, _, k_dense = m.encoder_k(im_k)
    torch.testing.assert_close(m.queue_global[:, :4], F.normalize(k, dim=1).T)
    expected = F.normalize(k_dense.mean(dim=(2, 3)), dim=1)  # pooled first, then normalised
    torch.testing.assert_close(m.queue_dense[:, :4], expected.T)
    torch.testing.assert_close(m.queue_dense[:, :4].norm(dim=0), torch.ones(4))
    assert int(m.queue_global_ptr) == 4 and int(m.queue_dense_ptr) == 4


def test_lambda_zero_is_moco_v2_infonce():
    m = tiny(loss_lambda=0.0)
    assert m.encoder_q.dense_head is None and not hasattr(m, "queue_dense")
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    queue = m.queue_global.clone()
    out = m(im_q, im_k)
    with torch.no_grad():
        q = F.normalize(m.encoder_q(im_q)[0], dim=1)
        k = F.normalize(m.encoder_k(im_k)[0], dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert "loss_dense" not in out


def test_total_loss_mixes_global_and_dense():
    m = tiny(loss_lambda=0.3)
    out = m(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), full_boxes(4, 64), no_flips(4))
    torch.testing.assert_close(out["loss"].detach(), 0.7 * out["loss_global"] + 0.3 * out["loss_dense"])
    out = m(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), full_boxes(4, 64), no_flips(4), loss_lambda=0.0)
    torch.testing.assert_close(out["loss"].detach(), out["loss_global"])


@pytest.mark.parametrize("size", [96, 160])
@pytest.mark.parametrize("s", [1, 3, 5, 7, 9])
def test_any_number_of_regions_at_any_input_size(s, size):
    m = tiny(num_regions=s, matching="geometric")
    x = torch.randn(2, 3, size, size)
    out = m(x, x, full_boxes(2, size), no_flips(2))
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_dense"])
    assert m.extract_dense(x).shape == (2, 512, s, s)
    assert out["corr_acc"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("matching", ["backbone", "projection"])
@pytest.mark.parametrize("s", [1, 3, 5])
def test_argmax_matching_on_identical_views_is_identity(matching, s):
    # 160 px -> 5x5 native grid, so every S <= 5 pools distinct cells (no ties)
    m = tiny(num_regions=s, matching=matching)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        _, grid, dense = m.encoder_q(x)
    chosen = m._match(grid, grid, dense, dense, None, None, s)
    assert torch.equal(chosen, torch.arange(s * s).expand(2, -1))
    out = m(x, x, full_boxes(2, 160), no_flips(2))
    assert out["corr_acc"].item() == pytest.approx(1.0)


def test_geometric_matching_needs_boxes():
    m = tiny(matching="geometric")
    with pytest.raises(ValueError, match="geometric"):
        m(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize(
    "sections, message",
    [
        (dict(matching=MatchingConfig(name="nearest")),
         "matching.name='nearest' is invalid: allowed: backbone, projection, random, geometric"),
        (dict(model=ModelConfig(loss_lambda=1.5)), r"model.loss_lambda=1.5 is invalid: allowed: a value in \[0, 1\]"),
        (dict(model=ModelConfig(num_regions=0)), "model.num_regions=0 is invalid"),
        (dict(model=ModelConfig(num_regions=17)), "model.num_regions=17 is invalid"),
        (dict(backbone=BackboneConfig(arch="resnet7")), "backbone.arch='resnet7' is invalid"),
    ],
)
def test_invalid_hyperparameters_name_the_key(sections, message):
    with pytest.raises(ConfigValueError, match=message):
        PretrainConfig(**sections).validate()


def test_the_model_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="'nearest' is not a valid Matching"):
        tiny(matching="nearest")
    with pytest.raises(ValueError, match="resnet7"):
        tiny(arch="resnet7")


def test_backbone_keys_are_torchvision_keys():
    m = tiny()
    ours = {k[len("encoder_q.backbone."):] for k in m.state_dict() if k.startswith("encoder_q.backbone.")}
    theirs = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert ours == theirs


def test_init_is_kaiming_fan_in():
    m = tiny(arch="resnet50")
    conv = m.encoder_q.backbone.layer4[0].conv2.weight  # 512 -> 512, 3x3: fan_in = 4608
    assert conv.std().item() == pytest.approx((2.0 / 4608) ** 0.5, rel=0.05)
    lin = m.encoder_q.global_head.mlp[0]
    assert lin.weight.std().item() == pytest.approx((2.0 / 2048) ** 0.5, rel=0.05)
    assert torch.count_nonzero(lin.bias) == 0


def reference_losses(enc_q, enc_k, im_q, im_k, queue_global, queue_dense, lam, tau=0.2):
    """A slow, plain-autograd DenseCL loss from the spec (cross-entropy per image and per grid cell), built
    on the encoders' modules only: no custom autograd, no batched matching."""
    c5_q = enc_q.backbone(im_q)
    q = F.normalize(enc_q.global_head(c5_q), dim=1)
    with torch.no_grad():
        c5_k = enc_k.backbone(im_k)
        k = F.normalize(enc_k.global_head(c5_k), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_global], 1) / tau
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    if lam == 0:
        return loss, k, None
    r = F.normalize(enc_q.dense_head(c5_q).flatten(2), dim=1)  # (N, D, P)
    with torch.no_grad():
        t = F.normalize(enc_k.dense_head(c5_k).flatten(2), dim=1)
        fq, fk = F.normalize(c5_q.flatten(2), dim=1), F.normalize(c5_k.flatten(2), dim=1)
        pooled = F.normalize(enc_k.dense_head(c5_k).mean(dim=(2, 3)), dim=1)
    cell_losses = []
    for n in range(r.shape[0]):
        for i in range(r.shape[2]):
            j = int(torch.argmax(fk[n].T @ fq[n, :, i]))  # the key cell most similar in backbone features
            row = torch.cat([(r[n, :, i] @ t[n, :, j]).view(1), r[n, :, i] @ queue_dense]) / tau
            cell_losses.append(F.cross_entropy(row.view(1, -1), torch.zeros(1, dtype=torch.long)))
    return (1 - lam) * loss + lam * torch.stack(cell_losses).mean(), k, pooled


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_training_steps_match_a_plain_autograd_reference(lam):
    """Three SGD steps of the model against the reference loss with a hand-written momentum update and
    queue: the weights, key encoder and queues must agree. The model runs in float64 but forms its losses in
    float32 (as under autocast), hence float32 tolerances; a wrong term moves the weights by far more."""
    torch.manual_seed(0)
    m = DenseCL(arch="resnet18", queue_len=8, momentum=0.9, loss_lambda=lam).double()
    enc_q, enc_k = copy.deepcopy(m.encoder_q), copy.deepcopy(m.encoder_k)
    queue_global = m.queue_global.clone()
    queue_dense = m.queue_dense.clone() if lam > 0 else None
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(enc_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        # the key view mirrors the query view, so that matching has to pick other cells than the identity
        im_q = torch.randn(4, 3, 96, 96, dtype=torch.float64)
        im_k = im_q.flip(-1) + 0.1 * torch.randn_like(im_q)
        out = m(im_q, im_k, full_boxes(4, 96).double(), no_flips(4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

        with torch.no_grad():
            for pk, pq in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
                pk.copy_(0.9 * pk + 0.1 * pq)
        loss, k, pooled = reference_losses(enc_q, enc_k, im_q, im_k, queue_global, queue_dense, lam)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        start = (step * 4) % 8
        queue_global[:, start:start + 4] = k.T
        if lam > 0:
            queue_dense[:, start:start + 4] = pooled.T

        torch.testing.assert_close(out["loss"].detach().double(), loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), ref in zip(m.encoder_q.named_parameters(), enc_q.parameters(), strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=name)
    for p, ref in zip(m.encoder_k.parameters(), enc_k.parameters(), strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.queue_global, queue_global, rtol=1e-5, atol=1e-6)
    if lam > 0:
        torch.testing.assert_close(m.queue_dense, queue_dense, rtol=1e-5, atol=1e-6)

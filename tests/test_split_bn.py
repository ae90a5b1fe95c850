"""Split BN (per-group statistics in one process) and the single-process key shuffle that goes with it."""

import pytest
import torch
from torch import nn
from torchvision import models

from densecl.distributed import shuffle_batch, unshuffle_batch
from densecl.method.settings import BackboneConfig
from densecl.method.split_bn import SplitBatchNorm2d, convert_split_batchnorm
from densecl.training.pretrain import model_from_settings
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.typed_settings import ConfigValueError
from densecl.weights.export import backbone_state_dict


def split_config(bn_splits: int) -> PretrainConfig:
    return PretrainConfig(
        backbone=BackboneConfig(arch="resnet18"),
        pretrain=TrainingConfig(queue_len=16, batch_size=8, bn_splits=bn_splits, crop_size=64),
    )


def reference_group_norm(x, weight, bias, eps, groups):
    """Slow reference: each contiguous group normalised with its own biased mean/variance."""
    out = []
    for chunk in x.chunk(groups):
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = ((chunk - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_training_output_normalises_each_group_alone(groups):
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, groups)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 3, 5, 5) * torch.arange(1, 9).view(8, 1, 1, 1)  # groups with different statistics
    out = bn(x)
    torch.testing.assert_close(out, reference_group_norm(x, bn.weight, bn.bias, bn.eps, groups))


def test_running_statistics_move_by_the_mean_of_the_groups_updates():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, 2, momentum=0.1)
    x = torch.randn(6, 3, 4, 4) + torch.tensor([0.0, 0, 0, 5, 5, 5]).view(6, 1, 1, 1)
    bn(x)
    means = [c.mean(dim=(0, 2, 3)) for c in x.chunk(2)]
    variances = [c.var(dim=(0, 2, 3), unbiased=True) for c in x.chunk(2)]
    torch.testing.assert_close(bn.running_mean, 0.1 * (means[0] + means[1]) / 2)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * (variances[0] + variances[1]) / 2)
    assert int(bn.num_batches_tracked) == 1


def test_evaluation_is_plain_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    plain.running_mean.uniform_(-1, 1)
    plain.running_var.uniform_(0.5, 2)
    split = SplitBatchNorm2d(4, 4)
    split.load_state_dict(plain.state_dict())
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(split.eval()(x), plain.eval()(x))


def test_without_running_statistics_each_group_is_still_normalised_alone():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    split = convert_split_batchnorm(nn.Sequential(plain), 2)[0]
    assert isinstance(split, SplitBatchNorm2d) and split.running_mean is None
    x = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 1, 4, 4]).view(4, 1, 1, 1)
    torch.testing.assert_close(split(x), reference_group_norm(x, torch.ones(3), torch.zeros(3), split.eps, 2))


def test_conversion_keeps_the_layers_dtype():
    split = convert_split_batchnorm(nn.Sequential(nn.BatchNorm2d(3).to(torch.bfloat16)), 2)[0]
    assert split.weight.dtype == split.running_mean.dtype == torch.bfloat16
    assert split.num_batches_tracked.dtype == torch.int64


def test_a_batch_that_does_not_split_evenly_is_a_clear_error():
    with pytest.raises(ValueError, match="batch of 6 does not split into bn_splits=4"):
        SplitBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))


def test_conversion_keeps_every_weight_and_key():
    torch.manual_seed(0)
    net = models.resnet18(weights=None)
    net.bn1.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convert_split_batchnorm(net, 4)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in net.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    after = net.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_local_shuffle_permutes_and_unshuffle_restores():
    torch.manual_seed(0)
    x = torch.arange(32.0).view(32, 1)
    shuffled, unshuffle = shuffle_batch(x, local=True)
    assert not torch.equal(shuffled, x)
    assert sorted(shuffled.flatten().tolist()) == x.flatten().tolist()
    torch.testing.assert_close(unshuffle_batch(shuffled, unshuffle), x)
    same, none = shuffle_batch(x)
    assert none is None and same is x


def test_model_with_split_bn_trains_and_exports_torchvision_keys():
    torch.manual_seed(0)
    cfg = split_config(bn_splits=4)
    cfg.validate()
    model = model_from_settings(cfg)
    assert isinstance(model.encoder_k.backbone.bn1, SplitBatchNorm2d)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    out = model(torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    net = models.resnet18(weights=None)
    missing, unexpected = net.load_state_dict(backbone_state_dict(model.state_dict()), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []


def test_key_encoder_sees_the_batch_shuffled_across_groups():
    """The positive key must be normalised with other images than its query: the key encoder receives a
    permutation of the batch, and its outputs come back in the original order."""
    torch.manual_seed(0)
    model = model_from_settings(split_config(bn_splits=2))
    seen = []
    model.encoder_k.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    im_k = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 64, 64).contiguous()
    model(torch.randn(8, 3, 64, 64), im_k)
    order = seen[0][:, 0, 0, 0].tolist()
    assert sorted(order) == list(range(8)) and order != list(range(8))


class WhoAmI(nn.Module):
    """Stands in for the key encoder: each output row is a one-hot of the id written into its input image, so
    the rows show which image they came from, whatever BN statistics the real encoder would use."""

    def forward(self, images):  # (global embedding 128, backbone grid 512 x 2 x 2, dense grid 128 x 2 x 2)
        ids = images[:, 0, 0, 0].long()
        one_hot = lambda width: torch.nn.functional.one_hot(ids, width).float()  # noqa: E731
        as_grid = lambda x: x[:, :, None, None].expand(-1, -1, 2, 2)  # noqa: E731
        return one_hot(128), as_grid(one_hot(512)), as_grid(one_hot(128))


def test_each_key_stays_aligned_with_its_query_through_the_shuffle(monkeypatch):
    """Shuffle-BN permutes the key batch before the key encoder: unshuffled, key i must come from image i again
    (a wrong unshuffle would pair queries with other images' keys and still train, silently)."""
    import densecl.method.model as model_module

    model = model_from_settings(split_config(bn_splits=4))
    model.encoder_k = WhoAmI()
    seen = []
    info_nce = model_module.info_nce
    monkeypatch.setattr(model_module, "info_nce", lambda q, k, *a: seen.append(k) or info_nce(q, k, *a))
    monkeypatch.setattr(model, "momentum_update", lambda: None)  # the stand-in has no weights to move
    im_k = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 64, 64).contiguous()
    model(torch.randn(8, 3, 64, 64), im_k)
    assert seen[0].argmax(dim=1).tolist() == list(range(8))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 6, "bn_splits": 4, "queue_len": 12},
         "pretrain.bn_splits=4 is invalid: must divide pretrain.batch_size=6 into equal BN groups"),
        ({"bn_splits": 2, "sync_bn": True}, "choose split BN or SyncBN"),
        ({"bn_splits": 0}, "pretrain.bn_splits=0 is invalid"),
    ],
)
def test_bad_split_settings_are_clear_errors(changes, message):
    cfg = PretrainConfig(pretrain=TrainingConfig(**{"queue_len": 64, **changes}))
    with pytest.raises(ConfigValueError, match=message):
        cfg.validate()

"""The pre-training engine: schedule, data order, checkpoints, exact resume, export, errors."""

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

from densecl.data.sampling import ResumableSampler
from densecl.data.settings import DataConfig
from densecl.method.model import DenseCL
from densecl.method.settings import BackboneConfig, MatchingConfig, ModelConfig
from densecl.resume import SettingsChangedError
from densecl.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from densecl.training.optim import lr_factor
from densecl.training.pretrain import load_trained_model, pretrain
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.training.trainer import NonFiniteLossError
from densecl.typed_settings import ConfigValueError
from densecl.weights.published import load_backbone_weights


def tiny_config(model: dict | None = None, matching: str = "backbone", data: DataConfig | None = None,
                **pretrain) -> PretrainConfig:
    """A few CPU iterations of ResNet-18 at 64 px; keyword arguments are `pretrain` section fields. A checkpoint
    (~140 MB, most of a tiny step's time) every 2 iterations: pass ckpt_every=100 where only the last one matters."""
    train = dict(crop_size=64, batch_size=4, queue_len=16, iters=6, epochs=None, ckpt_every=2, log_every=1,
                 num_workers=0, deterministic=True, progress=False, eval_every=0)
    train.update(pretrain)
    return PretrainConfig(
        backbone=BackboneConfig(arch="resnet18"),
        model=ModelConfig(**(model or {})),
        matching=MatchingConfig(name=matching),
        data=data or DataConfig(kind="synthetic", num_images=16, image_size=64, seed=0),
        pretrain=TrainingConfig(**train),
        device="cpu",
    )


def test_lr_scales_with_total_batch_and_follows_cosine():
    cfg = tiny_config(base_lr=0.03, batch_size=32)
    assert cfg.pretrain.scaled_lr(world_size=8) == pytest.approx(0.03)
    assert cfg.pretrain.scaled_lr(world_size=1) == pytest.approx(0.03 / 8)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)
    assert lr_factor(50, 100, 0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0) == pytest.approx(0.0)
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_sampler_resumes_mid_epoch_with_the_same_order():
    full = list(ResumableSampler(10, 2, 0, 1, seed=3, start_step=0, total_steps=12))
    tail = list(ResumableSampler(10, 2, 0, 1, seed=3, start_step=7, total_steps=12))
    assert full[7 * 2 :] == tail
    # 5 steps per epoch: each epoch is a permutation of all 10 indices, different across epochs
    epoch0 = [i for e, i in full if e == 0]
    epoch1 = [i for e, i in full if e == 1]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_sampler_splits_global_batches_between_ranks():
    ranks = [list(ResumableSampler(12, 3, r, 2, seed=0, start_step=0, total_steps=2)) for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert len(ranks[0]) == len(ranks[1]) == 6


# the default draws nothing from the global RNG during steps; split BN's key shuffle and random matching do
@pytest.mark.parametrize("settings", [{}, {"bn_splits": 2, "matching": "random"}], ids=["default", "global-rng"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, settings):
    def tiny_config(**kw):
        return globals()["tiny_config"](**settings, **kw)

    reference = pretrain(tiny_config(ckpt_every=100), tmp_path / "straight")  # the final checkpoint only
    assert reference.completed and reference.iterations == 6

    class Crash(Exception):
        pass

    def crash_at_five(step, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        pretrain(tiny_config(ckpt_every=4), tmp_path / "resumed", on_step=crash_at_five)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)["step"] == 4
    resumed = pretrain(tiny_config(ckpt_every=4), tmp_path / "resumed")
    assert resumed.iterations == 6

    a = load_checkpoint(reference.checkpoint_path)
    b = load_checkpoint(resumed.checkpoint_path)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    timing = "images_per_sec"
    assert {k: v for k, v in a["metrics"].items() if k != timing} == {
        k: v for k, v in b["metrics"].items() if k != timing
    }
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_should_stop_checkpoints_and_a_rerun_finishes(tmp_path):
    stops = iter([False, False, True])
    result = pretrain(tiny_config(iters=8, ckpt_every=100), tmp_path, should_stop=lambda: next(stops, False))
    assert not result.completed and result.iterations == 3
    assert load_checkpoint(result.checkpoint_path)["step"] == 3
    assert not result.backbone_path.exists()
    result = pretrain(tiny_config(iters=8, ckpt_every=100), tmp_path)
    assert result.completed and result.iterations == 8 and result.backbone_path.exists()


def test_rerun_of_a_finished_run_does_no_work(tmp_path):
    first = pretrain(tiny_config(iters=2), tmp_path)
    mtime = first.checkpoint_path.stat().st_mtime_ns
    calls = []
    again = pretrain(tiny_config(iters=2), tmp_path, on_step=lambda s, m: calls.append(s))
    assert calls == [] and again.iterations == 2 and again.metrics == first.metrics
    assert first.checkpoint_path.stat().st_mtime_ns == mtime


def test_resume_with_another_configuration_is_refused(tmp_path):
    pretrain(tiny_config(iters=2), tmp_path)
    with pytest.raises(SettingsChangedError, match="matching.name: 'backbone' then, 'random' now"):
        pretrain(tiny_config(iters=2, matching="random"), tmp_path)


def test_a_checkpoint_from_before_a_new_option_resumes_as_its_default(tmp_path):
    """Options added later (bn_splits, corr_eval_*, lr_schedule) are absent from older checkpoints: those runs
    had the default, so they resume; a saved value that differs is still refused."""
    stops = iter([False, True])
    pretrain(tiny_config(iters=4, ckpt_every=100), tmp_path, should_stop=lambda: next(stops, False))
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for key in ("bn_splits", "corr_eval_crop", "corr_eval_pairs", "corr_eval_every", "lr_schedule"):
        del state["config"]["pretrain"][key]
    torch.save(state, path)
    assert pretrain(tiny_config(iters=4, ckpt_every=100), tmp_path).iterations == 4
    state = load_checkpoint(path)
    state["config"]["pretrain"]["bn_splits"] = 2
    torch.save(state, path)
    with pytest.raises(SettingsChangedError, match="pretrain.bn_splits: 2 then, 1 now"):
        pretrain(tiny_config(iters=6, ckpt_every=100), tmp_path)


def test_length_in_epochs(tmp_path):
    steps = []
    result = pretrain(tiny_config(iters=None, epochs=2, ckpt_every=100), tmp_path,
                      on_step=lambda s, m: steps.append(s))
    assert result.iterations == 8 and steps == list(range(1, 9))  # 16 images / batch 4 = 4 per epoch


def test_the_cosine_can_step_once_per_epoch(tmp_path):
    """mmcv's CosineAnnealing with by_epoch (the official configs): the lr holds for an epoch, then moves."""
    assert [lr_factor(s, 8, 0, steps_per_epoch=4) for s in range(8)] == [1.0] * 4 + [pytest.approx(0.5)] * 4
    assert lr_factor(5, 8, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 8)))  # per iteration: moves
    lrs = {}
    pretrain(tiny_config(iters=None, epochs=2, lr_schedule="epoch", base_lr=0.64, ckpt_every=100), tmp_path,
             on_step=lambda s, m: lrs.update({s: m["lr"]}))  # 4 steps per epoch; lr = 0.01 x factor
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([0.01] * 3 + [0.005] * 4 + [0.0])
    with pytest.raises(ConfigValueError, match="pretrain.lr_schedule='epoch' is invalid: .*pretrain.epochs"):
        tiny_config(lr_schedule="epoch").validate()


def test_metrics_callback_reports_the_promised_keys(tmp_path):
    seen = []
    cfg = tiny_config(iters=2, model=dict(lambda_warmup_iters=1))
    pretrain(cfg, tmp_path, on_step=lambda s, m: seen.append((s, m)))
    keys = {"loss", "loss_global", "loss_dense", "lr", "lambda", "images_per_sec", "corr_acc", "corr_acc_chance"}
    assert [s for s, _ in seen] == [1, 2]
    for _, m in seen:
        assert keys <= m.keys() and all(math.isfinite(v) for v in m.values())
        assert 0.0 <= m["corr_acc"] <= 1.0 and 0.0 < m["corr_acc_chance"] <= 1.0
    assert seen[0][1]["lambda"] == 0.0 and seen[1][1]["lambda"] == 0.5  # warm-up: lambda = 0 first


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = DenseCL.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DenseCL, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at iteration 3.*last good checkpoint"):
        pretrain(tiny_config(), tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_queue_not_divisible_by_global_batch_fails_before_training(tmp_path):
    with pytest.raises(ConfigValueError, match="pretrain.queue_len=18 is invalid: .* global batch 4"):
        pretrain(tiny_config(queue_len=18), tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_data_set_smaller_than_a_batch_is_an_error(tmp_path):
    cfg = tiny_config(data=DataConfig(kind="synthetic", num_images=3, image_size=64))
    with pytest.raises(ValueError, match="3 images, fewer than one global batch of 4"):
        pretrain(cfg, tmp_path)


def test_exported_backbone_loads_into_torchvision_strictly(tmp_path):
    result = pretrain(tiny_config(iters=2), tmp_path)
    weights, arch = load_backbone_weights(result.backbone_path)
    assert arch == "resnet18"
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(weights, strict=True)
    model, cfg = load_trained_model(result.checkpoint_path)
    assert cfg.backbone.arch == "resnet18"
    for key, value in model.encoder_q.backbone.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    # the same weights are reachable from the training checkpoint itself
    from_ckpt, _ = load_backbone_weights(result.checkpoint_path)
    assert all(torch.equal(from_ckpt[k], weights[k]) for k in weights)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigValueError, match=r"model.lamda=0.5 is invalid: unknown key; known: name, loss_lambda"):
        PretrainConfig.from_dict({"model": {"lamda": 0.5}})
    cfg = PretrainConfig.from_dict({"backbone": {"arch": "resnet18"}, "data": {"kind": "synthetic", "num_images": 8}})
    assert cfg.data.num_images == 8 and cfg.backbone.arch == "resnet18"
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(iters=None, epochs=None), "pretrain.iters=None is invalid: set exactly one of pretrain.iters"),
        (dict(amp="fp8"), "pretrain.amp='fp8' is invalid"),
        (dict(data=DataConfig(kind="lmdb")), "data.kind='lmdb' is invalid"),
        (dict(batch_size=0), "pretrain.batch_size=0 is invalid"),
        (dict(model=dict(momentum=1.0)), r"model.momentum=1.0 is invalid: allowed: a value in \[0, 1\)"),
    ],
)
def test_invalid_config_messages(overrides, message):
    with pytest.raises(ConfigValueError, match=message):
        tiny_config(**overrides).validate()


def record_convolutions(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """Each convolution's (output dtype, whether its input was channels_last), appended as they run."""
    seen = []
    original = torch.nn.Conv2d.forward

    def recording_forward(self, x):
        out = original(self, x)
        seen.append((out.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    return seen


def test_bf16_on_cpu_runs_the_convolutions_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch):
    seen = record_convolutions(monkeypatch)
    metrics = []
    pretrain(tiny_config(iters=2, amp="bf16", deterministic=False), tmp_path,
             on_step=lambda s, m: metrics.append(m))
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)
    assert seen[0][1]  # the stem sees a channels_last batch
    assert all(math.isfinite(m["loss"]) for m in metrics)
    model, _ = load_trained_model(tmp_path / CHECKPOINT_NAME)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_on_cpu_warns_and_runs_in_fp32(tmp_path, monkeypatch):
    seen = record_convolutions(monkeypatch)
    with pytest.warns(UserWarning, match="amp='fp16' is ignored on cpu"):
        pretrain(tiny_config(iters=1, amp="fp16"), tmp_path)
    assert seen and {dtype for dtype, _ in seen} == {torch.float32}


def test_a_queue_holding_the_images_own_keys_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"queue_len=16 with 16 images seen 1.5 times each: .* 100% of the images"):
        pretrain(tiny_config(iters=6, ckpt_every=100), tmp_path / "repeats")  # 24 samples of 16 images, all queued
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrain(tiny_config(iters=4, ckpt_every=100, data=DataConfig(kind="synthetic", num_images=16,
                                                                     image_size=64)),
                 tmp_path / "one_pass")  # 16 samples: no image comes back

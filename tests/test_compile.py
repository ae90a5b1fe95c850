"""pretrain.compile=true: torch.compile of the encoders gives the eager run's keys and, up to rounding, its
weights; a compiled run resumes from its own checkpoint; the compiled key encoder follows the momentum update.

What these properties depend on is backend-independent: nn.Module.compile in place (keys, no `_orig_mod.`),
TorchDynamo's capture and AOTAutograd's functionalisation (parameters and buffers read as graph inputs, BN's
running statistics written back, the backward graph). The training run therefore compiles with backend
"aot_eager" (all of that, then the captured graphs run by eager kernels: seconds), and one check runs the
default backend, inductor (C++ kernels on the CPU), on the smallest graph of a training step, the key
encoder's no-grad forward: its numbers must be the eager ones, before and after an in-place momentum update.
That check compiles ~28 kernels (about a minute on a busy 2-core machine, a second once they are in inductor's
on-disk cache), against ~3 minutes for a whole compiled training run."""

import pytest
import torch
from torch._dynamo.utils import counters

from densecl.distributed import DistEnv
from densecl.training.checkpoint import load_checkpoint
from densecl.training.pretrain import build_model, load_trained_model, pretrain
from densecl.weights.published import load_backbone_weights
from tests.test_engine import tiny_config

# split BN with its in-batch shuffle (bn_splits=2), the momentum update and both queues act in every step;
# momentum 0.9 rather than 0.999 so that the key encoder moves measurably in 3 steps
SETTINGS = dict(iters=3, bn_splits=2, ckpt_every=100)
MODEL = dict(momentum=0.9)


@pytest.fixture
def aot_eager(monkeypatch):
    """Every torch.compile (nn.Module.compile calls it) on backend 'aot_eager'; the backends asked for, listed."""
    asked, compile = [], torch.compile

    def on_aot_eager(*args, backend="inductor", **kwargs):
        asked.append(backend)
        return compile(*args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", on_aot_eager)
    return asked


def stopped_then_resumed(tmp_path, **pretrain_fields):
    """Stopped after step 2 (its checkpoint is written by that run's model), then rerun to the end."""
    cfg, stops = tiny_config(MODEL, **SETTINGS, **pretrain_fields), iter([False, True])
    stopped = pretrain(cfg, tmp_path, should_stop=lambda: next(stops, False))
    assert not stopped.completed and load_checkpoint(stopped.checkpoint_path)["step"] == 2
    return pretrain(cfg, tmp_path)


@pytest.mark.slow
def test_compiled_pretraining_matches_eager_and_resumes(tmp_path, aot_eager, one_thread):
    # both runs stop and resume alike: a resumed bn_splits > 1 run is not bit-equal to a straight one (the data
    # loader's base seed is drawn from the restored RNG stream before the shuffle-BN permutations)
    eager = stopped_then_resumed(tmp_path / "eager")
    assert aot_eager == []
    counters.clear()
    compiled = stopped_then_resumed(tmp_path / "compiled", compile=True)
    assert aot_eager == ["inductor"] * 4  # both encoders, in the stopped run and in the resumed one
    assert counters["stats"]["unique_graphs"] >= 2  # encoder_q (forward + backward) and encoder_k ran compiled
    assert compiled.completed and compiled.iterations == 3

    a, b = load_checkpoint(eager.checkpoint_path)["model"], load_checkpoint(compiled.checkpoint_path)["model"]
    assert list(a) == list(b)  # no `_orig_mod.`: the same keys, in the same order
    for key in a:  # measured: bit-equal on aot_eager; inductor's fused kernels: at most 4e-6 apart (BN variances ~2)
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    start = build_model(tiny_config(MODEL, **SETTINGS), DistEnv(0, 1, 0), torch.device("cpu"))
    initial, params = start.state_dict(), {name for name, _ in start.named_parameters()}
    groups = {  # each far closer to the eager run than to where training started (measured: 0; inductor < 0.01)
        "query encoder weights": [k for k in params if k.startswith("encoder_q.")],
        "key encoder weights": [k for k in params if k.startswith("encoder_k.")],
        "BN statistics and queues": [k for k in a if k not in params and a[k].is_floating_point()],
    }
    for name, keys in groups.items():
        moved = max((a[k] - initial[k]).abs().max() for k in keys)
        apart = max((a[k] - b[k]).abs().max() for k in keys)
        assert apart < 0.02 * moved, (name, apart, moved)

    weights_a, _ = load_backbone_weights(eager.backbone_path)
    weights_b, arch = load_backbone_weights(compiled.backbone_path)
    assert arch == "resnet18" and list(weights_a) == list(weights_b)
    model, _ = load_trained_model(compiled.checkpoint_path)  # strict load into an uncompiled model
    assert all(torch.equal(v, weights_b[k]) for k, v in model.encoder_q.backbone.state_dict().items())


@pytest.mark.slow
def test_the_inductor_compiled_key_encoder_gives_eager_numbers_and_follows_the_momentum_update(one_thread):
    """inductor, the default backend, as pretrain.compile=true builds it: the compiled key encoder's outputs are
    its eager forward's, and the compiled graph reads the parameters as they are now: after an in-place momentum
    update (and a resume's load_state_dict, which copies in place too) it still equals the eager forward. The
    training step's shapes and mode (train, no grad), so the kernels are the ones a compiled run uses."""
    model = build_model(tiny_config(MODEL, compile=True, **SETTINGS), DistEnv(0, 1, 0), torch.device("cpu"))
    model.train()
    counters.clear()
    images = torch.randn(4, 3, 64, 64)
    outputs = []
    with torch.no_grad():
        for _ in range(2):
            compiled, eager = model.encoder_k(images), model.encoder_k.forward(images)  # forward: not compiled
            for c, e in zip(compiled, eager, strict=True):  # measured: within 1.3e-5 of the largest entry
                torch.testing.assert_close(c, e, rtol=0, atol=1e-4 * e.abs().max().item())
            outputs.append(eager[0])
            for p in model.encoder_q.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
            model.momentum_update()
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1  # inductor ran
    change = (outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()
    assert change > 0.05  # measured: 0.3; a graph that kept the old weights would be that far off

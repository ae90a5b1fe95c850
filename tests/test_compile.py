"""pretrain.compile=true: torch.compile (inductor, C++ on the CPU) of the encoders gives the eager run's keys and,
up to fusion's rounding, its weights, and a compiled run resumes from its own checkpoint.

Slow: inductor compiles ~50 C++ kernels on first use (about 3 minutes on a busy 2-core machine, under a minute
once they are in inductor's on-disk cache), so one compiled run, stopped and resumed, serves every check."""

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


def stopped_then_resumed(tmp_path, **pretrain_fields):
    """Stopped after step 2 (its checkpoint is written by that run's model), then rerun to the end."""
    cfg, stops = tiny_config(MODEL, **SETTINGS, **pretrain_fields), iter([False, True])
    stopped = pretrain(cfg, tmp_path, should_stop=lambda: next(stops, False))
    assert not stopped.completed and load_checkpoint(stopped.checkpoint_path)["step"] == 2
    return pretrain(cfg, tmp_path)


@pytest.mark.slow
def test_compiled_pretraining_matches_eager_and_resumes(tmp_path):
    # both runs stop and resume alike: a resumed bn_splits > 1 run is not bit-equal to a straight one (the data
    # loader's base seed is drawn from the restored RNG stream before the shuffle-BN permutations)
    eager = stopped_then_resumed(tmp_path / "eager")
    counters.clear()
    compiled = stopped_then_resumed(tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] >= 2  # encoder_q (forward + backward) and encoder_k ran compiled
    assert compiled.completed and compiled.iterations == 3

    a, b = load_checkpoint(eager.checkpoint_path)["model"], load_checkpoint(compiled.checkpoint_path)["model"]
    assert list(a) == list(b)  # no `_orig_mod.`: the same keys, in the same order
    for key in a:  # measured: at most 4e-6 apart (BN running variances ~2)
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    start = build_model(tiny_config(MODEL, **SETTINGS), DistEnv(0, 1, 0), torch.device("cpu"))
    initial, params = start.state_dict(), {name for name, _ in start.named_parameters()}
    groups = {  # each far closer to the eager run than to where training started (measured: < 0.01 of it)
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
def test_the_compiled_key_encoder_follows_the_momentum_update():
    """The compiled graphs read the parameters as they are now: after an in-place momentum update (and a resume's
    load_state_dict, which copies in place too), the compiled key encoder equals its eager forward. Shapes and
    modes are the training step's, so the graph compiled above (or in inductor's cache) is reused."""
    model = build_model(tiny_config(MODEL, compile=True, **SETTINGS), DistEnv(0, 1, 0), torch.device("cpu"))
    model.train()
    images = torch.randn(4, 3, 64, 64)
    outputs = []
    with torch.no_grad():
        for _ in range(2):
            compiled, eager = model.encoder_k(images), model.encoder_k.forward(images)  # forward: not compiled
            for c, e in zip(compiled, eager, strict=True):  # measured: within 1.5e-5 of the largest entry
                torch.testing.assert_close(c, e, rtol=0, atol=1e-4 * e.abs().max().item())
            outputs.append(eager[0])
            for p in model.encoder_q.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
            model.momentum_update()
    change = (outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()
    assert change > 0.05  # measured: 0.3; a graph that kept the old weights would be that far off

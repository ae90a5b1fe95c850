"""Correspondence accuracy on fixed view pairs: against a slow per-cell loop, and inside the engine."""

import pytest
import torch
import torch.nn.functional as F

from densecl.data.sampling import with_view_size
from densecl.data.settings import DataConfig
from densecl.data.sources import UnlabeledImageFolder
from densecl.evaluation.correspondence import ViewPairs, evaluate_correspondence, fixed_view_pairs
from densecl.method.matching import geometric_match
from densecl.training.checkpoint import load_checkpoint
from densecl.training.pretrain import build_dataset, model_from_settings, pretrain
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.typed_settings import ConfigValueError
from tests.test_engine import tiny_config


def slow_backbone_accuracy(model, pairs: ViewPairs) -> float:
    """Obviously correct reference: per pair and per judgeable query cell, the most cosine-similar key cell
    of the C5 grid, counted right when within one row and one column of the geometric truth."""
    hits = judged = 0
    with torch.no_grad():
        for views, boxes, flips in zip(pairs.views, pairs.boxes, pairs.flips):
            q = model.encoder_q.backbone(views[:1])[0]
            k = model.encoder_q.backbone(views[1:])[0]
            s = q.shape[-1]
            truth, inside = geometric_match(boxes[:1], flips[:1], boxes[1:], flips[1:], s)
            for cell in range(s * s):
                if not inside[0, cell]:
                    continue
                qv = q[:, cell // s, cell % s]
                sims = [F.cosine_similarity(qv, k[:, j // s, j % s], dim=0) for j in range(s * s)]
                best = int(torch.stack(sims).argmax())
                true = int(truth[0, cell])
                judged += 1
                hits += abs(best // s - true // s) <= 1 and abs(best % s - true % s) <= 1
    return hits / judged


@pytest.fixture
def model_and_pairs():
    cfg = tiny_config(crop_size=64)
    torch.manual_seed(0)
    model = model_from_settings(cfg)
    model.train()
    pairs = fixed_view_pairs(with_view_size(build_dataset(cfg), 160), 6)
    return model, pairs


def test_accuracy_equals_a_slow_per_cell_loop(model_and_pairs):
    model, pairs = model_and_pairs
    model.eval()
    expected = slow_backbone_accuracy(model, pairs)
    model.train()
    result = evaluate_correspondence(model, pairs, torch.device("cpu"), batch_size=4)
    assert result["corr_eval_regions"] == 5
    assert result["corr_acc_eval"] == pytest.approx(expected, abs=1e-6)
    assert 0 < result["corr_acc_eval_chance"] < 0.5  # a 5 x 5 grid: most cells are not neighbours
    assert model.encoder_q.training  # the evaluation put the encoder back in training mode


def test_geometric_matching_is_always_right_and_random_draws_leave_training_rng_alone(model_and_pairs):
    model, pairs = model_and_pairs
    model.matching = "geometric"
    assert evaluate_correspondence(model, pairs, torch.device("cpu"))["corr_acc_eval"] == 1.0
    model.matching = "random"
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    evaluate_correspondence(model, pairs, torch.device("cpu"))
    assert torch.equal(torch.rand(1), before)


def test_pairs_are_the_same_at_every_call():
    cfg = tiny_config()
    a = fixed_view_pairs(with_view_size(build_dataset(cfg), 96), 3)
    b = fixed_view_pairs(with_view_size(build_dataset(cfg), 96), 3)
    assert a.views.shape == (3, 2, 3, 96, 96)
    assert torch.equal(a.views, b.views) and torch.equal(a.boxes, b.boxes)


def test_evaluation_views_reuse_the_training_file_list(tmp_path, monkeypatch):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (80, 60), (40 * i, 10, 200)).save(tmp_path / f"{i}.png")
    folder = DataConfig(kind="image_folder", root=str(tmp_path))
    cfg = PretrainConfig(data=folder, pretrain=TrainingConfig(crop_size=32))
    training = build_dataset(cfg)
    walks = []
    monkeypatch.setattr(UnlabeledImageFolder, "__init__", lambda *a, **k: walks.append(a))
    evaluation = with_view_size(training, 48)
    assert walks == []  # no second walk of the folder
    assert evaluation.base._relative_paths is training.base._relative_paths
    assert evaluation[(0, 1)][0].shape[-1] == 48 and training[(0, 1)][0].shape[-1] == 32


def test_engine_logs_the_curve_from_iteration_zero_and_keeps_the_weights(tmp_path):
    logged = {}
    cfg = tiny_config(corr_eval_crop=128, corr_eval_pairs=4, corr_eval_every=2, ckpt_every=100)  # the last only
    result = pretrain(cfg, tmp_path / "with", on_step=lambda step, m: logged.setdefault(step, m))
    steps = [step for step, metrics in logged.items() if "corr_acc_eval" in metrics]
    assert steps == [0, 2, 4, 6]
    assert logged[0]["corr_eval_regions"] == 4
    assert result.metrics["corr_acc_eval"] == logged[6]["corr_acc_eval"]  # the final figure is the last evaluation
    pretrain(tiny_config(ckpt_every=100), tmp_path / "without")
    with_eval = load_checkpoint(tmp_path / "with" / "checkpoint.pt", torch.device("cpu"))["model"]
    without = load_checkpoint(tmp_path / "without" / "checkpoint.pt", torch.device("cpu"))["model"]
    for key, value in without.items():
        assert torch.equal(with_eval[key], value), key


def test_eval_interval_must_fall_on_logged_steps():
    with pytest.raises(ConfigValueError, match="pretrain.corr_eval_every=3 is invalid: must be a multiple of "
                       "pretrain.log_every=2"):
        tiny_config(corr_eval_crop=128, corr_eval_every=3, log_every=2).validate()

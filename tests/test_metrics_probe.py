"""Segmentation scores against a slow per-class loop, and the dense linear probe end to end."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from densecl.evaluation.metrics import confusion_matrix, segmentation_scores, trivial_miou
from densecl.evaluation.probe import feature_rank, run_linear_probe, scenes
from densecl.evaluation.settings import LinearProbeConfig
from densecl.resume import SettingsChangedError
from densecl.typed_settings import ConfigValueError


def slow_scores(pred, target, num_classes, ignore=255):
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    ious, accs, freqs = [], [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        if tp + fp + fn > 0:
            ious.append((c, tp / (tp + fp + fn)))
        if tp + fn > 0:
            accs.append(tp / (tp + fn))
        freqs.append((tp + fn) / target.size)
    return {
        "mIoU": 100 * np.mean([v for _, v in ious]),
        "fwIoU": 100 * sum(freqs[c] * v for c, v in ious),
        "mAcc": 100 * np.mean(accs),
        "pAcc": 100 * np.mean(pred == target),
    }


def test_scores_match_slow_reference():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 20, 20))
    target[0, :2] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 6, size=target.shape))
    pred[target == 255] = 0
    ours = segmentation_scores(confusion_matrix(pred, target, 6))
    ref = slow_scores(pred, target, 6)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key]), key


def test_ground_truth_as_prediction_scores_100():
    target = np.random.default_rng(1).integers(0, 4, size=(2, 8, 8))
    scores = segmentation_scores(confusion_matrix(target, target, 4))
    assert scores == {"mIoU": 100.0, "fwIoU": 100.0, "mAcc": 100.0, "pAcc": 100.0}


def test_trivial_miou_is_the_most_frequent_class_everywhere():
    """Against the plain way: label every pixel with the most frequent true class and score that."""
    rng = np.random.default_rng(0)
    target = rng.choice(4, size=(3, 20, 20), p=[0.7, 0.1, 0.2, 0.0])
    target[0, :2, :2] = 255  # ignored pixels count for nothing
    pred = rng.integers(0, 4, size=target.shape)
    everywhere = np.full(target.shape, np.bincount(target[target != 255].ravel()).argmax())
    expected = segmentation_scores(confusion_matrix(everywhere, target, 4))["mIoU"]
    assert trivial_miou(confusion_matrix(pred, target, 4)) == pytest.approx(expected)
    assert expected == pytest.approx(100 * np.mean(target[target != 255] == 0) / 3)  # 3 classes present


def test_out_of_range_labels_are_errors():
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\)"):
        confusion_matrix(np.zeros(4), np.array([0, 1, 7, 2]), 3)


@pytest.mark.slow
def test_linear_probe_runs_and_caches(tmp_path):
    cfg = LinearProbeConfig(arch="resnet18", image_size=64, input_size=96, num_train=16, num_val=8, epochs=2,
                            batch_size=8, device="cpu")
    metrics = run_linear_probe(cfg, None, tmp_path)
    assert set(metrics) == {"mIoU", "fwIoU", "mAcc", "pAcc", "mIoU_trivial", "feature_rank"}
    val_labels = scenes(cfg, "val")[1]  # the floor beside the scores, counted from the validation maps
    counts = torch.bincount(val_labels.flatten())
    assert metrics["mIoU_trivial"] == pytest.approx(100 * counts.max().item() / counts.sum().item()
                                                    / torch.count_nonzero(counts).item())
    assert 1.0 <= metrics["feature_rank"] <= 16 * 3 * 3  # bounded by the positions: 16 images x C5's 3 x 3
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert run_linear_probe(cfg, None, tmp_path) == metrics  # finished: read back, not recomputed
    with pytest.raises(SettingsChangedError, match="config.epochs: 2 then, 3 now"):
        run_linear_probe(dataclasses.replace(cfg, epochs=3), None, tmp_path)
    assert run_linear_probe(dataclasses.replace(cfg, device="auto"), None, tmp_path) == metrics  # changes no result
    # a folder probed before `class_weighting` existed ran with its default: read back, not refused
    recorded = json.loads((tmp_path / "probe_config.json").read_text())
    del recorded["config"]["class_weighting"]
    (tmp_path / "probe_config.json").write_text(json.dumps(recorded))
    assert run_linear_probe(cfg, None, tmp_path) == metrics
    with pytest.raises(SettingsChangedError, match="config.class_weighting: 'none' then, 'balanced' now"):
        run_linear_probe(dataclasses.replace(cfg, class_weighting="balanced"), None, tmp_path)


def test_linear_probe_rejects_mismatched_weights(tmp_path):
    from densecl.evaluation.probe import load_frozen_backbone
    from densecl.weights.export import save_backbone

    path = save_backbone({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "b.pth", "resnet50")
    with pytest.raises(ValueError, match="holds a resnet50 backbone but the probe was asked for resnet18"):
        load_frozen_backbone("resnet18", path)


def test_probe_classifier_learns_from_informative_features():
    """With features that encode the labels (pooled one-hot maps + noise), the 1x1 probe must recover them:
    evidence that a low probe score means uninformative features, not a broken probe."""
    import torch.nn.functional as F

    from densecl.evaluation.probe import fit_and_score, scenes

    cfg = LinearProbeConfig(image_size=64, input_size=64, num_train=24, num_val=8, epochs=40, batch_size=8, lr=0.5,
                            device="cpu")
    _, train_labels = scenes(cfg, "train")
    _, val_labels = scenes(cfg, "val")
    torch.manual_seed(0)

    def oracle(labels):
        one_hot = F.one_hot(labels, 9).permute(0, 3, 1, 2).float()
        return F.avg_pool2d(one_hot, 4) + 0.05 * torch.randn(labels.shape[0], 9, 16, 16)

    scores = fit_and_score(oracle(train_labels), train_labels, oracle(val_labels), val_labels, 9, cfg, "cpu")
    assert scores["mIoU"] > 50.0


def test_default_learning_rate_converges_within_the_synthetic_presets_schedule():
    """The synthetic presets fit 30 epochs of 4 steps (256 scenes, batch 64). With the default lr that must
    reach the loss of a four times longer fit: an unconverged probe ranks backbones by how fast SGD moves on
    their features, not by what a linear classifier can read from them. Proxy: standardised features whose
    labels are a noisy linear function of them, at the same number of steps."""
    import torch.nn.functional as F

    from densecl.evaluation.probe import train_classifier

    torch.manual_seed(0)
    feats = torch.randn(64, 64, 8, 8)
    logits = torch.einsum("kc,nchw->nkhw", torch.randn(9, 64) * 3 / 8, feats) + torch.randn(64, 9, 8, 8)
    labels = F.interpolate(logits.argmax(1)[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()

    def final_loss(epochs):
        cfg = LinearProbeConfig(epochs=epochs, batch_size=16, device="cpu")  # default lr
        classifier = train_classifier(feats, labels, 9, cfg, torch.device("cpu"))
        with torch.no_grad():
            out = F.interpolate(classifier(feats), size=(16, 16), mode="bilinear", align_corners=False)
            return F.cross_entropy(out, labels).item()

    assert final_loss(30) <= 1.02 * final_loss(120)


def test_balanced_class_weights_are_median_frequency_and_zero_for_absent_classes():
    from densecl.evaluation.probe import class_weights

    labels = torch.tensor([0] * 80 + [1] * 16 + [3] * 4)  # class 2 absent; frequencies 0.8, 0.16, 0.04
    weights = class_weights(labels, 4, "balanced")
    assert weights.tolist() == pytest.approx([0.16 / 0.8, 1.0, 0.0, 0.16 / 0.04])
    assert class_weights(labels, 4, "none") is None
    with pytest.raises(ConfigValueError, match="class_weighting='inverse' is invalid: allowed: none, balanced"):
        LinearProbeConfig(class_weighting="inverse").validate()


def test_balanced_probe_finds_a_rare_class_that_plain_cross_entropy_ignores():
    """A rare class whose feature only weakly shifts: plain cross-entropy predicts the majority everywhere,
    the balanced probe recovers part of it, which is what lets the probe rank weak backbones."""
    from densecl.evaluation.probe import fit_and_score

    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(64, 8, 8, generator=gen) < 0.05).long()
    shift = torch.tensor([0.7, 0.0, 0.0, 0.0])[:, None, None]  # the rare class moves one channel by 0.7 sigma
    feats = torch.randn(64, 4, 8, 8, generator=gen) + labels[:, None].float() * shift
    train, val = slice(0, 48), slice(48, 64)
    scores = {}
    for weighting in ("none", "balanced"):
        cfg = LinearProbeConfig(epochs=20, batch_size=16, lr=0.5, class_weighting=weighting, device="cpu")
        scores[weighting] = fit_and_score(feats[train], labels[train], feats[val], labels[val], 2, cfg, "cpu")
    assert scores["none"]["mAcc"] < 55.0
    assert scores["balanced"]["mAcc"] > scores["none"]["mAcc"] + 5.0


def slow_rankme(feats: np.ndarray) -> float:
    rows = feats.transpose(0, 2, 3, 1).reshape(-1, feats.shape[1]).astype(np.float64)
    rows = (rows - rows.mean(axis=0)) / (rows.std(axis=0, ddof=1) + 1e-6)
    singular = np.linalg.svd(rows, compute_uv=False)
    entropy = 0.0
    for s in singular:
        p = s / singular.sum() + 1e-12
        entropy -= p * np.log(p)
    return float(np.exp(entropy))


def test_feature_rank_matches_slow_reference_and_counts_directions():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 6, 5, 5, generator=gen) * torch.arange(1, 7).view(1, 6, 1, 1)
    assert feature_rank(feats) == pytest.approx(slow_rankme(feats.numpy()), rel=1e-9)
    isotropic = torch.randn(64, 16, 8, 8, generator=gen)  # 4096 positions of 16 independent channels
    assert 15.0 < feature_rank(isotropic) <= 16.0
    sources = torch.randn(64, 3, 8, 8, generator=gen)
    mixed = torch.einsum("nkhw,kc->nchw", sources, torch.randn(3, 16, generator=gen))  # 16 channels, 3 directions
    assert feature_rank(mixed) < 3.0 + 1e-6
    assert feature_rank(isotropic, max_positions=512) == pytest.approx(feature_rank(isotropic), rel=0.05)


def test_random_init_trunk_is_a_function_of_the_seed():
    from densecl.evaluation.probe import load_frozen_backbone

    first = load_frozen_backbone("resnet18", None, seed=1).state_dict()
    torch.rand(10)  # the global RNG state must not matter
    again = load_frozen_backbone("resnet18", None, seed=1).state_dict()
    other = load_frozen_backbone("resnet18", None, seed=2).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])

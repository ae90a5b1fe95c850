"""Feature-quality signals during pre-training (densecl.quality): k-NN and image labels against slow
references, the probe and k-NN score features that hold the answer near the top, and the signals leave
training untouched: the same weights with them as without, curves at 0, every N steps and the end."""

from __future__ import annotations

import pytest
import torch
from test_engine import tiny_config

from densecl.engine import pretrain
from densecl.export import load_backbone_weights
from densecl.quality import NUM_CLASSES, QualitySet, evaluate_features, image_labels, knn_accuracy


def knn_reference(train_feats, train_labels, val_feats, val_labels, k):
    correct = 0
    for feat, label in zip(val_feats, val_labels):
        sims = [float(torch.dot(feat / feat.norm(), t / t.norm())) for t in train_feats]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, int] = {}
        for i in nearest:
            votes[int(train_labels[i])] = votes.get(int(train_labels[i]), 0) + 1
        best = max(votes.values())
        predicted = next(int(train_labels[i]) for i in nearest if votes[int(train_labels[i])] == best)
        correct += predicted == int(label)
    return 100.0 * correct / len(val_labels)


@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_accuracy_matches_a_loop_reference_ties_included(k):
    gen = torch.Generator().manual_seed(k)
    train, val = torch.randn(40, 6, generator=gen), torch.randn(25, 6, generator=gen)
    train_labels, val_labels = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (25,), generator=gen)
    assert knn_accuracy(train, train_labels, val, val_labels, k) == pytest.approx(
        knn_reference(train, train_labels, val, val_labels, k))


def test_an_image_is_labelled_by_the_object_class_covering_most_of_it():
    dense = torch.zeros(3, 4, 4, dtype=torch.long)
    dense[0, :2, :2], dense[0, 3, :3] = 2, 5  # 4 pixels of class 2, 3 of class 5, background the most
    dense[1, :, :] = 4
    assert image_labels(dense).tolist() == [2, 4, 0]


class LabelEncoder(torch.nn.Module):
    """A stand-in backbone whose C4 is the one-hot label map and whose C5 the class proportions: features that
    hold the answer (images here are the one-hot maps themselves)."""

    def forward_features(self, x):
        return [torch.zeros_like(x), torch.zeros_like(x), x, x]  # C2, C3 hold nothing


def test_features_that_hold_the_answer_score_near_the_top():
    data = QualitySet.scenes(num_train=48, num_val=24, input_size=64)
    one_hot = lambda labels: torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()  # noqa: E731
    data = QualitySet(one_hot(data.train_labels), data.train_labels, one_hot(data.val_labels), data.val_labels)
    scores = evaluate_features(LabelEncoder(), data, torch.device("cpu"))
    assert scores["probe_mIoU"] > 90 and scores["probe_mIoU_trivial"] < 20
    assert scores["knn_acc"] > 75 and scores["knn_acc"] > scores["knn_acc_chance"] + 30


def test_the_signals_leave_training_untouched_and_log_at_zero_every_n_and_the_end(tmp_path):
    logged = []
    # split BN shuffles the keys with the global RNG: the evaluation must leave that stream alone too
    signals = dict(eval_every=4, eval_num_train=8, eval_num_val=4, eval_size=64)
    with_signals = pretrain(tiny_config(bn_splits=2, **signals), tmp_path / "on",
                            on_step=lambda step, m: logged.append((step, sorted(m))))
    without = pretrain(tiny_config(bn_splits=2), tmp_path / "off")
    (on, _), (off, _) = load_backbone_weights(with_signals.backbone_path), load_backbone_weights(without.backbone_path)
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    quality = ["knn_acc", "knn_acc_chance", "probe_mIoU", "probe_mIoU_trivial"]
    assert [step for step, keys in logged if keys == quality] == [0, 4, 6]
    assert set(quality) <= with_signals.metrics.keys() and not set(quality) & without.metrics.keys()


def test_the_cost_benchmark_times_every_evaluation_of_a_run():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    overrides = ["pretrain.iters=4", "pretrain.batch_size=4", "pretrain.queue_len=16", "pretrain.crop_size=64",
                 "data.num_images=16", "pretrain.eval_num_train=8", "pretrain.eval_num_val=4", "pretrain.eval_size=64",
                 "pretrain.figure.enabled=false", "pretrain.corr_eval_crop=null"]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "quality_cost.py"), *overrides], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluations = re.search(r"(\d+) evaluations: ([\d.]+) s", done.stdout)
    assert evaluations and int(evaluations.group(1)) == 5, done.stdout  # at 0, 1, 2, 3, 4: 4 // QUALITY_EVALS = 1
    share = re.search(r"signals: [\d.]+ s = ([\d.]+)% of the pre-training", done.stdout)
    assert share and 0 < float(share.group(1)) < 100, done.stdout

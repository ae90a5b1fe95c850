"""Feature-quality signals during pre-training (densecl.evaluation.quality): k-NN and image labels against slow
references, the probe and k-NN score features that hold the answer near the top, and the signals leave
training untouched: the same weights with them as without, curves at 0, every N steps and the end."""

from __future__ import annotations

import pytest
import torch
from test_engine import tiny_config

from densecl.evaluation.quality import NUM_CLASSES, QualitySet, evaluate_features, image_labels, knn_accuracy
from densecl.training.pretrain import pretrain
from densecl.weights.published import load_backbone_weights


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


class NoiseEncoder(torch.nn.Module):
    """A stand-in backbone whose features are noise, whatever the image: they hold nothing of the answer."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward_features(self, x):
        noise = torch.randn(x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4, generator=self.gen)
        return [noise, noise, noise, noise]


def test_features_that_hold_nothing_score_near_the_floor():
    """The negative control of the test above: the same sets and scoring, uninformative features."""
    data = QualitySet.scenes(num_train=32, num_val=24, input_size=64)
    scores = evaluate_features(NoiseEncoder(), data, torch.device("cpu"))
    assert scores["probe_mIoU"] < scores["probe_mIoU_trivial"] + 10
    assert scores["knn_acc"] < scores["knn_acc_chance"] + 20


def test_the_query_encoder_is_the_one_scored(monkeypatch):
    """The signals judge the backbone that is exported and transferred (the query encoder's), not the
    momentum-updated key encoder's (made to differ here, as it does after the first step)."""
    from types import SimpleNamespace

    from densecl.training import hooks
    from densecl.training.pretrain import model_from_settings

    model = model_from_settings(tiny_config())
    with torch.no_grad():
        for param in model.encoder_k.backbone.parameters():
            param.add_(1.0)
    scored = []
    monkeypatch.setattr(hooks, "evaluate_features", lambda backbone, *a, **k: scored.append(backbone) or {})
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), step=0, total_steps=2, metrics={})
    hook = hooks.FeatureQuality(data=None, every=1, on_step=None)
    hook.before_train(trainer)
    trainer.step = 2
    hook.after_step(trainer)
    assert len(scored) == 2 and all(b is model.encoder_q.backbone for b in scored)


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


# ------------------------------------------------------------------------- VOC segmentation as the set
VOC_COLOURS = {0: (0, 0, 0), 5: (255, 0, 0), 12: (0, 255, 0), 15: (0, 0, 255)}  # class -> pixel colour


def write_voc2012(root, num_train: int = 6, num_val: int = 4, size: int = 80, bad_value: int | None = None):
    """A VOC2012 segmentation folder whose pixels show their class's colour: background, a dominant class (a
    wide band, cycling over three) and a narrow one, VOC's 255 outlines around the image. Returns the root."""
    import numpy as np
    from PIL import Image
    from test_paper_layouts import _lines, _palette_png

    voc = root / "VOC2012"
    ids = {"train": [f"2007_{i:06d}" for i in range(num_train)], "val": [f"2008_{i:06d}" for i in range(num_val)]}
    for n, image_id in enumerate(ids["train"] + ids["val"]):
        dominant, narrow = (5, 12, 15)[n % 3], (5, 12, 15)[(n + 1) % 3]
        label = np.zeros((size, size), dtype=np.uint8)
        label[:, size // 4 : size // 4 + size // 2 + 4 * (n % 2)] = dominant
        label[:, -size // 8 :] = narrow
        label[:2], label[-2:] = 255, 255
        if bad_value is not None and n == 1:
            label[10:14, 10:14] = bad_value
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        for c, colour in VOC_COLOURS.items():
            pixels[label == c] = colour
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        _palette_png(voc / "SegmentationClass" / f"{image_id}.png", label)
    for split, split_ids in ids.items():
        _lines(voc / "ImageSets" / "Segmentation" / f"{split}.txt", split_ids)
    return voc


class ColourEncoder(torch.nn.Module):
    """A stand-in backbone whose C4 and C5 are the image itself: on write_voc2012's images, features that hold
    the answer."""

    def forward_features(self, x):
        return [x, x, x, x]


def test_a_voc_folder_gives_its_first_listed_images_with_their_own_labels(tmp_path):
    import numpy as np
    from PIL import Image

    voc = write_voc2012(tmp_path)
    data = QualitySet.voc(voc, num_train=4, num_val=3, input_size=64)
    assert data.num_classes == 21
    assert data.train_images.shape == (4, 3, 64, 64) and data.val_labels.shape == (3, 32, 32)
    for labels, split, count in ((data.train_labels, "2007", 4), (data.val_labels, "2008", 3)):
        for n in range(count):
            written = Image.open(voc / "SegmentationClass" / f"{split}_{n:06d}.png").resize((32, 32), Image.NEAREST)
            assert np.array_equal(labels[n].numpy(), np.asarray(written)), (split, n)
    assert (data.train_labels == 255).any() and set(data.train_labels.unique().tolist()) <= {0, 5, 12, 15, 255}


def test_on_voc_features_that_hold_the_answer_score_near_the_top_and_outlines_are_ignored(tmp_path):
    from densecl.evaluation.metrics import confusion_matrix, trivial_miou

    data = QualitySet.voc(write_voc2012(tmp_path, num_train=12, num_val=6), 12, 6, input_size=64)
    scores = evaluate_features(ColourEncoder(), data, torch.device("cpu"))
    # the floor from the val labels themselves (255 left out): the most frequent class everywhere
    truth = data.val_labels.numpy()
    floor = trivial_miou(confusion_matrix(truth * 0, truth, 21))
    assert scores["probe_mIoU_trivial"] == pytest.approx(floor)
    assert scores["probe_mIoU"] > 90 and scores["probe_mIoU"] > floor + 50
    assert scores["knn_acc"] > scores["knn_acc_chance"] + 30


def test_a_voc_label_neither_class_nor_ignore_and_a_missing_part_are_named(tmp_path):
    from densecl.evaluation.quality import QualitySetError

    voc = write_voc2012(tmp_path, bad_value=30)
    with pytest.raises(QualitySetError, match=r"2007_000001\.png holds label values \[30\]; expected 0-20 or 255"):
        QualitySet.voc(voc, 4, 2, 64)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(QualitySetError, match=r"lacks ImageSets/Segmentation/val\.txt"):
        QualitySet.voc(voc, 4, 2, 64)


def test_pretraining_scores_the_signals_on_the_voc_folder_it_is_given(tmp_path):
    from densecl.evaluation.metrics import confusion_matrix, trivial_miou

    voc = write_voc2012(tmp_path)
    logged = []
    result = pretrain(tiny_config(eval_every=3, eval_data=str(voc), eval_num_train=6, eval_num_val=4, eval_size=64),
                      tmp_path / "run", on_step=lambda step, m: logged.append((step, dict(m))))
    signals = [(step, m) for step, m in logged if "probe_mIoU" in m]
    assert [step for step, _ in signals] == [0, 3, 6]
    truth = QualitySet.voc(voc, 6, 4, 64).val_labels.numpy()
    voc_floor = trivial_miou(confusion_matrix(truth * 0, truth, 21))
    scenes = QualitySet.scenes(6, 4, 64).val_labels.numpy()  # the default set, which must not be the one scored
    assert result.metrics["probe_mIoU_trivial"] == pytest.approx(voc_floor)
    assert voc_floor != pytest.approx(trivial_miou(confusion_matrix(scenes * 0, scenes, NUM_CLASSES)))


def test_the_pipeline_takes_voc_for_the_signals_when_the_data_folder_holds_it(tmp_path):
    from densecl.typed_settings import ConfigValueError
    from pipelines import schema

    def resolved(*overrides):
        return schema.settings(schema.compose([f"paths.data_dir={tmp_path}", *overrides])).pretrain.eval_data

    assert resolved() == "scenes"
    voc = write_voc2012(tmp_path)
    assert resolved() == str(voc)
    assert resolved("pretrain.eval_data=scenes") == "scenes"
    (voc / "SegmentationClass").rename(tmp_path / "elsewhere")
    assert resolved() == "scenes"  # an incomplete folder is not taken
    with pytest.raises(ConfigValueError, match=r"pretrain\.eval_data=.*missing: SegmentationClass"):
        schema.validate(schema.compose([f"pretrain.eval_data={voc}"]))

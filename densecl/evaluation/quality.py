"""Feature-quality signals during pre-training: whether the backbone is learning features that transfer, seen
while it trains rather than after the downstream stages.

Every `pretrain.eval_every` iterations the query backbone, frozen, is scored on a small labelled set (the
built-in scenes, or the first images of VOC2012's segmentation train and val lists): a dense linear probe on
C4 (mIoU, beside the trivial mIoU of the most frequent class everywhere) and a k-NN accuracy on its pooled C5
features (each image labelled by the class covering most of it, beside the most-frequent-class rate). The
evaluation runs in eval mode under a forked RNG, so training's random stream and BN statistics are untouched:
a run with the signals gives the same weights as one without.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from densecl.data.synthetic import CLASS_NAMES
from densecl.data.voc import VOC_CLASSES, missing_segmentation_parts
from densecl.evaluation.metrics import IGNORE_INDEX
from densecl.evaluation.probe import fit_and_score, scenes
from densecl.evaluation.settings import LinearProbeConfig
from densecl.method.backbone import ResNetTrunk

NUM_CLASSES = len(CLASS_NAMES) + 1  # the scenes': background + their classes
VOC_NUM_CLASSES = len(VOC_CLASSES) + 1  # background + VOC's 20
KNN_K = 5
QUALITY_EVALS = 4  # times over the schedule when pretrain.eval_every is null: the cost stays a few percent


class QualitySetError(ValueError):
    """A labelled set the signals cannot use; names the file and what was expected."""


@dataclass
class QualitySet:
    """Images normalised for the backbone and dense labels (IGNORE_INDEX where unlabelled), train and val."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int = NUM_CLASSES

    @classmethod
    def scenes(cls, num_train: int, num_val: int, input_size: int, seed: int = 0) -> QualitySet:
        cfg = LinearProbeConfig(image_size=input_size // 2, input_size=input_size, num_train=num_train,
                                num_val=num_val, data_seed=seed)
        return cls(*scenes(cfg, "train"), *scenes(cfg, "val"))

    @classmethod
    def voc(cls, root: str | Path, num_train: int, num_val: int, input_size: int) -> QualitySet:
        """The first `num_train` ids of ImageSets/Segmentation/train.txt and `num_val` of val.txt, with VOC's own
        labels (SegmentationClass): images resized to input_size (square, as the scenes), labels to half of it
        by nearest neighbour, VOC's 255 outlines left as ignored pixels."""
        root = Path(root)
        missing = missing_segmentation_parts(root)
        if missing:
            raise QualitySetError(f"{root}: not a VOC2012 segmentation folder, it lacks {', '.join(missing)}")
        splits = []
        for split, count in (("train", num_train), ("val", num_val)):
            list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()][:count]
            if not ids:
                raise QualitySetError(f"{list_file} lists no image id")
            pairs = [_voc_pair(root, i, input_size) for i in ids]
            splits += [torch.stack([image for image, _ in pairs]), torch.stack([label for _, label in pairs])]
        return cls(*splits, num_classes=VOC_NUM_CLASSES)


def _voc_pair(root: Path, image_id: str, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = root / "JPEGImages" / f"{image_id}.jpg", root / "SegmentationClass" / f"{image_id}.png"
    for path in (image_file, label_file):
        if not path.is_file():
            raise QualitySetError(f"{path} is missing (listed in ImageSets/Segmentation)")
    with Image.open(image_file) as image:
        pixels = TF.to_tensor(image.convert("RGB").resize((input_size, input_size), resample=Image.BILINEAR))
    with Image.open(label_file) as label_image:
        if label_image.mode not in ("P", "L"):
            raise QualitySetError(f"{label_file} is a {label_image.mode} image; expected class indices (palette "
                                  f"or gray PNG)")
        label = np.asarray(label_image.resize((input_size // 2, input_size // 2), resample=Image.NEAREST))
    unknown = sorted(set(np.unique(label).tolist()) - set(range(VOC_NUM_CLASSES)) - {IGNORE_INDEX})
    if unknown:
        raise QualitySetError(f"{label_file} holds label values {unknown}; expected 0-{VOC_NUM_CLASSES - 1} or "
                              f"{IGNORE_INDEX} (ignored)")
    return TF.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD), torch.from_numpy(label.astype(np.int64))


def probe_config(seed: int = 0) -> LinearProbeConfig:
    """The dense probe's recipe: the pipeline probe's (C4, balanced classes), fewer epochs on fewer images."""
    return LinearProbeConfig(layer="c4", class_weighting="balanced", epochs=10, batch_size=16, seed=seed,
                             progress=False)


def image_labels(dense: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Each image's class: the object class covering most of its pixels (background only when none shows);
    ignored pixels count for none."""
    counts = torch.stack([torch.bincount(d.flatten(), minlength=num_classes)[:num_classes] for d in dense])
    objects = counts[:, 1:]
    return torch.where(objects.sum(1) > 0, objects.argmax(1) + 1, torch.zeros(len(dense), dtype=torch.long))


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, k: int = KNN_K) -> float:
    """Percent of val images whose k nearest train images (cosine) vote for their label; a tie goes to the
    tied class with the nearest neighbour."""
    sims = F.normalize(val_feats, dim=1) @ F.normalize(train_feats, dim=1).T
    order = sims.argsort(dim=1, descending=True)[:, : min(k, len(train_feats))]
    votes = train_labels[order]  # (val, k), nearest first
    counts = F.one_hot(votes, int(train_labels.max()) + 1).sum(1)
    tied = counts == counts.max(dim=1, keepdim=True).values
    first_tied = tied.gather(1, votes).float().argmax(1)  # the nearest neighbour whose class is among the tied
    predicted = votes.gather(1, first_tied[:, None]).squeeze(1)
    return 100.0 * float((predicted == val_labels).float().mean())


@torch.no_grad()
def _features(backbone: ResNetTrunk, images: torch.Tensor, device: torch.device, batch: int = 32):
    c4, c5 = [], []
    for start in range(0, len(images), batch):
        feats = backbone.forward_features(images[start : start + batch].to(device))
        c4.append(feats[2].float().cpu())
        c5.append(feats[3].float().mean(dim=(2, 3)).cpu())
    return torch.cat(c4), torch.cat(c5)


def evaluate_features(backbone: ResNetTrunk, data: QualitySet, device: torch.device, seed: int = 0) -> dict:
    """probe_mIoU, probe_mIoU_trivial, knn_acc and knn_acc_chance of the backbone as it is now."""
    was_training = backbone.training
    backbone.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            train_c4, train_c5 = _features(backbone, data.train_images, device)
            val_c4, val_c5 = _features(backbone, data.val_images, device)
            probe = fit_and_score(train_c4, data.train_labels, val_c4, data.val_labels, data.num_classes,
                                  probe_config(seed), device)
    finally:
        backbone.train(was_training)
    train_classes = image_labels(data.train_labels, data.num_classes)
    val_classes = image_labels(data.val_labels, data.num_classes)
    chance = 100.0 * float(torch.bincount(val_classes).max()) / len(val_classes)
    return {
        "probe_mIoU": probe["mIoU"],
        "probe_mIoU_trivial": probe["mIoU_trivial"],
        "knn_acc": knn_accuracy(train_c5, train_classes, val_c5, val_classes),
        "knn_acc_chance": chance,
    }

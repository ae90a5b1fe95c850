"""Semantic-segmentation scores from a confusion matrix (mIoU, fwIoU, mAcc, pAcc), numpy-2 safe."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255  # unlabelled pixels (VOC's object outlines): in no score and no loss


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """conf[t, p] = number of pixels of true class t predicted as p; `ignore_index` pixels are left out."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal {ignore_index}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray, class_names: list[str] | None = None) -> dict[str, float]:
    """Percentages, as the segmentation literature reports them. Classes absent from both the ground
    truth and the predictions are left out of the means (their IoU is undefined); with class names,
    each defined per-class IoU is reported too, as `IoU-<name>`."""
    conf = np.asarray(conf, dtype=np.float64)
    true_per_class = conf.sum(axis=1)
    pred_per_class = conf.sum(axis=0)
    hits = np.diag(conf)
    union = true_per_class + pred_per_class - hits
    total = conf.sum()
    if total == 0:
        raise ValueError("empty confusion matrix: no labelled pixel was evaluated")
    valid_iou = union > 0
    iou = np.divide(hits, union, out=np.zeros_like(hits), where=valid_iou)
    present = true_per_class > 0
    acc = np.divide(hits, true_per_class, out=np.zeros_like(hits), where=present)
    freq = true_per_class / total
    scores = {
        "mIoU": 100.0 * float(iou[valid_iou].mean()),
        "fwIoU": 100.0 * float((freq[valid_iou] * iou[valid_iou]).sum()),
        "mAcc": 100.0 * float(acc[present].mean()),
        "pAcc": 100.0 * float(hits.sum() / total),
    }
    for k, name in enumerate(class_names or []):
        if valid_iou[k]:
            scores[f"IoU-{name}"] = 100.0 * float(iou[k])
    return scores


def trivial_miou(conf: np.ndarray) -> float:
    """The mIoU of labelling every pixel with the most frequent true class (background on VOC-like sets): the
    floor a segmentation model has to beat before it has learnt anything."""
    conf = np.asarray(conf)
    truth = conf.sum(axis=1)
    trivial = np.zeros_like(conf)
    trivial[:, truth.argmax()] = truth
    return segmentation_scores(trivial)["mIoU"]

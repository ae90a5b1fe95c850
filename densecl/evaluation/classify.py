"""A classification sanity check of the global branch: a linear classifier on frozen, pooled C5 features of a
labelled image folder (one sub-folder per class, torchvision's ImageFolder), the linear-evaluation recipe at
small scale. Dense transfer says whether the dense features are good; this says whether the global ones are
(DenseCL's authors report no clear classification gain, so a healthy run should match MoCo v2 here).

Recipe: resize the short side to input_size x 8/7 and centre-crop input_size (the standard evaluation view),
features standardised per channel with the training statistics (a BN without affine, as linear probes use),
SGD with momentum 0.9 and a cosine schedule, no weight decay. The classifier is seeded; the split too.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets
from torchvision import transforms as T

from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from densecl.distributed import resolve_device
from densecl.evaluation.probe import load_frozen_backbone
from densecl.evaluation.settings import LinearClassifierConfig
from densecl.files import write_json
from densecl.resume import Reuse, reuse_recorded
from densecl.typed_settings import plain


def _folder(root: str, size: int) -> datasets.ImageFolder:
    view = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return datasets.ImageFolder(root, transform=view)
    except (FileNotFoundError, RuntimeError) as err:  # no class folder, or a class folder without images
        raise ValueError(f"{root}: not a folder of class sub-folders holding images ({err})") from None


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(count) into (train, val), val holding round(fraction * count) >= 1."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    num_val = max(1, round(fraction * count))
    if num_val >= count:
        raise ValueError(f"{count} images cannot be split with val_fraction={fraction} into two non-empty sets")
    return sorted(order[num_val:]), sorted(order[:num_val])


@torch.no_grad()
def _features(trunk, folder: datasets.ImageFolder, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for start in range(0, len(indices), 64):
        batch = [folder[i] for i in indices[start : start + 64]]
        images = torch.stack([image for image, _ in batch]).to(device)
        feats.append(trunk(images).float().mean(dim=(2, 3)).cpu())
        labels += [label for _, label in batch]
    return torch.cat(feats), torch.tensor(labels)


def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: LinearClassifierConfig,
                 device) -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        classifier = torch.nn.Linear(feats.shape[1], num_classes).to(device)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=0.9)
        steps_per_epoch = -(-len(feats) // cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(feats))
            for start in range(0, len(feats), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                loss = F.cross_entropy(classifier(feats[idx].to(device)), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier


def classify(cfg: LinearClassifierConfig, weights: str | os.PathLike | None) -> dict[str, float]:
    """top1 (and top5 with more than 5 classes) on the val images, beside top1_chance (the most frequent
    class), of a linear classifier on frozen features of `weights` (None: random init)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    trunk = load_frozen_backbone(cfg.arch, weights, cfg.seed).to(device)
    train_folder = _folder(cfg.root, cfg.input_size)
    if cfg.val_root is None:
        val_folder = train_folder
        train_idx, val_idx = split_indices(len(train_folder), cfg.val_fraction, cfg.seed)
    else:
        val_folder = _folder(cfg.val_root, cfg.input_size)
        if val_folder.classes != train_folder.classes:
            raise ValueError(f"{cfg.val_root}: classes {val_folder.classes} differ from {cfg.root}'s "
                             f"{train_folder.classes}")
        train_idx, val_idx = list(range(len(train_folder))), list(range(len(val_folder)))
    train_feats, train_labels = _features(trunk, train_folder, train_idx, device)
    val_feats, val_labels = _features(trunk, val_folder, val_idx, device)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    num_classes = len(train_folder.classes)
    classifier = train_linear((train_feats - mean) / std, train_labels, num_classes, cfg, device)
    with torch.no_grad():
        logits = classifier(((val_feats - mean) / std).to(device)).cpu()
    metrics = {
        "top1": 100.0 * float((logits.argmax(1) == val_labels).float().mean()),
        "top1_chance": 100.0 * float(torch.bincount(val_labels, minlength=num_classes).max()) / len(val_labels),
        "num_classes": float(num_classes),
    }
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["top5"] = 100.0 * float((top5 == val_labels[:, None]).any(1).float().mean())
    return metrics


def run_classification(cfg: LinearClassifierConfig, weights, output_dir) -> dict[str, float]:
    """`classify`, its metrics.json then classify_config.json written into output_dir; a finished folder is read
    back, one finished with other settings refused (densecl.resume)."""
    output_dir = Path(output_dir)
    metrics_file, config_file = output_dir / "metrics.json", output_dir / "classify_config.json"
    current = {"config": plain(cfg), "weights": str(weights) if weights else None}
    decision = reuse_recorded(output_dir, config_file, LinearClassifierConfig, current, metrics_file.exists())
    if decision is Reuse.DONE:
        return json.loads(metrics_file.read_text())
    metrics = classify(cfg, weights)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics_file, metrics)
    write_json(config_file, current)  # last: its presence marks the folder finished
    return metrics

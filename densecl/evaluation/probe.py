"""Frozen-backbone dense linear probe: a 1x1 classifier on frozen features, scored by mIoU.

Cheap (features are computed once) and sensitive to how much per-location class information the
pre-trained features hold, which is exactly what dense pre-training claims to improve. It runs on the
built-in synthetic scenes (semantic masks come with the generator, no disk set needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from densecl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from densecl.data.synthetic import CLASS_NAMES, VAL_INDEX_OFFSET, generate_scene
from densecl.distributed import resolve_device
from densecl.evaluation.metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores, trivial_miou
from densecl.evaluation.settings import LinearProbeConfig
from densecl.files import write_json
from densecl.method.backbone import ResNetTrunk
from densecl.resume import Reuse, reuse_recorded
from densecl.typed_settings import plain
from densecl.weights.published import load_backbone_weights


def load_frozen_backbone(arch: str, weights: str | os.PathLike | None, seed: int = 0) -> ResNetTrunk:
    """A ResNet trunk with the given weights loaded strictly (None: torchvision's random init drawn from `seed`,
    so that a random-init probe is reproducible and its seeds differ)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = ResNetTrunk(arch)
    if weights is not None:
        state, saved_arch = load_backbone_weights(weights)
        if saved_arch is not None and saved_arch != arch:
            raise ValueError(f"{weights} holds a {saved_arch} backbone but the probe was asked for {arch}")
        trunk.load_state_dict(state, strict=True)
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad = False
    return trunk


def scenes(cfg: LinearProbeConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images normalised at input_size (N, 3, H, W), semantic labels at image_size (N, h, w))."""
    count, offset = (cfg.num_train, 0) if split == "train" else (cfg.num_val, VAL_INDEX_OFFSET)
    images, labels = [], []
    for i in range(count):
        scene = generate_scene(cfg.data_seed, offset + i, cfg.image_size)
        image = TF.to_tensor(scene.image.resize((cfg.input_size, cfg.input_size), resample=2))  # bilinear
        images.append(TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD))
        labels.append(torch.from_numpy(scene.semantic.astype(np.int64)))
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def extract(trunk: ResNetTrunk, images: torch.Tensor, layer: str, device: torch.device, batch: int = 32,
            progress: bool = False):
    index = {"c3": 1, "c4": 2, "c5": 3}[layer]
    trunk.to(device)
    starts = tqdm(range(0, len(images), batch), desc=f"probe: {layer} features", disable=not progress, leave=False)
    return torch.cat([trunk.forward_features(images[i : i + batch].to(device))[index].float().cpu() for i in starts])


def class_weights(labels: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor | None:
    """Median-frequency balancing: weight_c = median(freq) / freq_c over the classes present (absent ones get 0).

    Background covers most pixels of a scene; with plain cross-entropy, weak features give a probe that
    predicts background everywhere, so every backbone scores the same and the probe cannot rank them.
    """
    if kind == "none":
        return None
    counts = torch.bincount(labels.flatten(), minlength=num_classes)[:num_classes].double()
    present = counts > 0
    freq = counts / counts.sum()
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = freq[present].median() / freq[present]
    return weights.float()


def train_classifier(feats, labels, num_classes, cfg: LinearProbeConfig, device) -> torch.nn.Conv2d:
    torch.manual_seed(cfg.seed)
    weights = class_weights(labels, num_classes, cfg.class_weighting)
    weights = weights.to(device) if weights is not None else None
    classifier = torch.nn.Conv2d(feats.shape[1], num_classes, 1).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, len(feats) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.epochs), desc="probe: classifier", disable=not cfg.progress, leave=False):
        order = torch.randperm(len(feats), generator=gen)
        for start in range(0, max(1, len(feats) - cfg.batch_size + 1), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = classifier(feats[idx].to(device))
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels[idx].to(device), weight=weights, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return classifier


@torch.no_grad()
def predict(classifier, feats, size, device, batch: int = 64) -> torch.Tensor:
    preds = []
    for start in range(0, len(feats), batch):
        logits = classifier(feats[start : start + batch].to(device))
        preds.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1).cpu())
    return torch.cat(preds)


def feature_rank(feats: torch.Tensor, max_positions: int = 8192, seed: int = 0) -> float:
    """RankMe (Garrido et al., 2023) of the per-channel standardised features, one row per position: exp of the
    entropy of the singular values normalised to sum 1, between 1 and the channel count.

    Early contrastive training first squeezes the features onto a few directions; a frozen random network
    keeps many, which is why it can out-score a briefly pre-trained one on a linear probe. Reporting the
    rank beside the probe's scores tells that case apart from features that are merely poor.
    """
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    if len(rows) > max_positions:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_positions]]
    rows = (rows - rows.mean(dim=0)) / (rows.std(dim=0) + 1e-6)
    singular = torch.linalg.svdvals(rows)
    p = singular / singular.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def fit_and_score(train_feats, train_labels, val_feats, val_labels, num_classes, cfg, device) -> dict[str, float]:
    """Standardise features per channel with the training statistics (a BN without affine, as linear probes
    use), fit the 1x1 classifier, and score its upsampled predictions on the validation maps (with the mIoU of
    the most frequent class everywhere, the floor to beat)."""
    mean = train_feats.mean(dim=(0, 2, 3), keepdim=True)
    std = train_feats.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    classifier = train_classifier((train_feats - mean) / std, train_labels, num_classes, cfg, device)
    preds = predict(classifier, (val_feats - mean) / std, val_labels.shape[-2:], device)
    confusion = confusion_matrix(preds.numpy(), val_labels.numpy(), num_classes)
    return {**segmentation_scores(confusion), "mIoU_trivial": trivial_miou(confusion)}


def run_linear_probe(cfg: LinearProbeConfig, weights: str | os.PathLike | None, output_dir) -> dict[str, float]:
    """Train the probe on frozen features of `weights` (None: random init) and return mIoU, fwIoU, mAcc, pAcc
    and the features' effective rank (feature_rank).

    Writes metrics.json (the scores) and then probe_config.json (what produced them) into output_dir; a
    finished output_dir is read back instead of recomputed, one finished with other settings is refused
    (densecl.resume).
    """
    cfg.validate()
    output_dir = Path(output_dir)
    metrics_file, config_file = output_dir / "metrics.json", output_dir / "probe_config.json"
    current = {"config": plain(cfg), "weights": str(weights) if weights else None}
    if reuse_recorded(output_dir, config_file, LinearProbeConfig, current, metrics_file.exists()) is Reuse.DONE:
        return json.loads(metrics_file.read_text())
    device = resolve_device(cfg.device)
    trunk = load_frozen_backbone(cfg.arch, weights, cfg.seed)
    num_classes = len(CLASS_NAMES) + 1
    train_images, train_labels = scenes(cfg, "train")
    val_images, val_labels = scenes(cfg, "val")
    train_feats = extract(trunk, train_images, cfg.layer, device, progress=cfg.progress)
    metrics = fit_and_score(
        train_feats, train_labels, extract(trunk, val_images, cfg.layer, device, progress=cfg.progress), val_labels,
        num_classes, cfg,
        device,
    )
    metrics["feature_rank"] = feature_rank(train_feats, seed=cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics_file, metrics)
    write_json(config_file, current)  # last: its presence marks the folder finished
    return metrics

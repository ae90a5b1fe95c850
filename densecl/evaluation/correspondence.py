"""Correspondence accuracy on a fixed set of view pairs at a chosen crop size, during pre-training.

Why: the accuracy logged with each training step is measured at the training crop, whose grid can be too
coarse to tell anything (at 96 px the 3 x 3 grid puts most cells within one cell of any other: chance is
~0.64). Evaluating the same matcher on fixed pairs at a larger crop (160 px: a 5 x 5 grid, chance ~0.29)
gives a curve comparable across iterations and runs, as in the paper's observation that matches start
mostly wrong and become right with training. The evaluation runs in eval mode without gradients: it
changes no weight, statistic or RNG stream, so a run with it ends with the same weights as one without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from densecl.method.matching import chance_correspondence_accuracy, correspondence_accuracy, geometric_match


@dataclass
class ViewPairs:
    views: torch.Tensor  # (N, 2, 3, H, W)
    boxes: torch.Tensor  # (N, 2, 4)
    flips: torch.Tensor  # (N, 2)


EVAL_EPOCH = 10**9  # no run trains this many epochs: the evaluated views differ from the ones trained on


def fixed_view_pairs(dataset: Dataset, count: int, epoch: int = EVAL_EPOCH) -> ViewPairs:
    """The first `count` items of a `SeededViews`-style data set indexed by (epoch, index): the same pairs
    at every call."""
    count = min(count, len(dataset))
    if count < 1:
        raise ValueError("the correspondence evaluation needs at least one view pair")
    items = [dataset[(epoch, i)] for i in range(count)]
    return ViewPairs(*(torch.stack([item[k] for item in items]) for k in range(3)))


@torch.no_grad()
def evaluate_correspondence(model, pairs: ViewPairs, device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of the model's own matching strategy (DenseCL._match) on the pairs, pooled over all
    judgeable query cells, with the chance level on the same crops. Returns corr_acc_eval,
    corr_acc_eval_chance and corr_eval_regions (S)."""
    encoder = model.encoder_q
    was_training = encoder.training
    encoder.eval()
    chosen, truth, inside = [], [], []
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # random matching draws here, not from training's stream
        try:
            for start in range(0, pairs.views.shape[0], batch_size):
                views = pairs.views[start : start + batch_size].to(device)
                boxes = pairs.boxes[start : start + batch_size].to(device)
                flips = pairs.flips[start : start + batch_size].to(device)
                _, q_grid, q_dense = encoder(views[:, 0])
                _, k_grid, k_dense = encoder(views[:, 1])
                regions = q_grid.shape[-1]
                chosen.append(model._match(q_grid, k_grid, q_dense, k_dense, boxes, flips, regions).cpu())
                geo, ins = geometric_match(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], regions)
                truth.append(geo.cpu())
                inside.append(ins.cpu())
        finally:
            encoder.train(was_training)
    chosen, truth, inside = torch.cat(chosen), torch.cat(truth), torch.cat(inside)
    return {
        "corr_acc_eval": float(correspondence_accuracy(chosen, truth, inside, regions)),
        "corr_acc_eval_chance": float(chance_correspondence_accuracy(truth, inside, regions)),
        "corr_eval_regions": float(regions),
    }

"""The paper's correspondence figure: which cells of two views of one image a trained model matches.

Following the authors' visualisation (DenseCL#13), a match is a *mutual* nearest neighbour between the two
views' SxS backbone features (`DenseCL.extract_dense`) whose cosine similarity exceeds a threshold (0.9 in
the paper). This is for looking only: training matches one-directionally with no threshold. Each match is
also checked against the geometric truth the crop boxes and flips give (`densecl.method.matching.geometric_match`):
drawn green when the key cell is within one cell of where the query cell's centre really lies, red otherwise.
Library code: plain tensors and PIL images in, a matplotlib Figure out (no pyplot, no global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from densecl.data.augment import TwoViewAugmentation
from densecl.method.matching import geometric_match, within_one_cell


@dataclass
class ViewMatches:
    """Mutual nearest-neighbour matches between view 0 (query) and view 1 (key) of one image.

    Cells are row-major indices on the SxS grid. `correct` is None where no geometry was given; `inside`
    marks query cells whose centre lies inside both crops (only those can be judged).
    """

    query_cells: torch.Tensor  # (M,) long
    key_cells: torch.Tensor  # (M,) long
    similarity: torch.Tensor  # (M,) float
    num_regions: int
    correct: torch.Tensor | None = None  # (M,) bool
    inside: torch.Tensor | None = None  # (M,) bool

    def __len__(self) -> int:
        return int(self.query_cells.numel())

    @property
    def precision(self) -> float:
        """Fraction of judgeable matches that are geometrically right (NaN when none can be judged)."""
        if self.correct is None or self.inside is None or not bool(self.inside.any()):
            return float("nan")
        return float(self.correct[self.inside].float().mean())


def mutual_nearest_neighbours(
    query: torch.Tensor, key: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i, j) with j the most similar key cell of query cell i and i the most similar query cell of
    key cell j, and similarity above `threshold`. query, key: L2-normalised (C, P). Returns
    (query indices, key indices, similarities), sorted by query index."""
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(
            f"expected two equal (C, P) feature maps, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    sim = query.T.float() @ key.float()  # (P_query, P_key)
    best_key = sim.argmax(dim=1)
    best_query = sim.argmax(dim=0)
    cells = torch.arange(sim.shape[0], device=sim.device)
    similarity = sim[cells, best_key]
    keep = (best_query[best_key] == cells) & (similarity > threshold)
    return cells[keep], best_key[keep], similarity[keep]


@torch.no_grad()
def match_views(
    model: torch.nn.Module,
    views: torch.Tensor,
    threshold: float = 0.9,
    boxes: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
) -> list[ViewMatches]:
    """Matches for a batch of view pairs. views: (N, 2, 3, H, W); boxes (N, 2, 4) and flips (N, 2) as
    `TwoViewAugmentation` returns them (optional: without them matches are not judged).

    `model` is anything with `extract_dense(images) -> (N, C, S, S)` L2-normalised features (DenseCL)."""
    if views.dim() != 5 or views.shape[1] != 2:
        raise ValueError(f"views must be (N, 2, 3, H, W), got {tuple(views.shape)}")
    device = next(model.parameters()).device
    n = views.shape[0]
    feats = model.extract_dense(views.flatten(0, 1).to(device)).float().cpu()  # (2N, C, S, S)
    num_regions = feats.shape[-1]
    feats = feats.view(n, 2, feats.shape[1], -1)
    truth, inside = None, None
    if boxes is not None and flips is not None:
        truth, inside = geometric_match(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], num_regions)
    out = []
    for i in range(n):
        q_idx, k_idx, sim = mutual_nearest_neighbours(feats[i, 0], feats[i, 1], threshold)
        correct = judged = None
        if truth is not None:
            judged = inside[i, q_idx]
            correct = within_one_cell(k_idx, truth[i, q_idx], num_regions) & judged
        out.append(ViewMatches(q_idx, k_idx, sim, num_regions, correct, judged))
    return out


def crop_for_display(image: Image.Image, box: torch.Tensor, flip: bool, size: int) -> np.ndarray:
    """The region a view was cropped from, resized and flipped like the view but without its colour
    augmentation: (size, size, 3) uint8, so the figure shows the scene, not the jitter."""
    view = image.convert("RGB").resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box))
    if flip:
        view = ImageOps.mirror(view)
    return np.asarray(view)


def _cell_centres(cells: torch.Tensor, num_regions: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    step = size / num_regions
    rows, cols = (cells // num_regions).numpy(), (cells % num_regions).numpy()
    return (cols + 0.5) * step, (rows + 0.5) * step


def draw_matches(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    matches: Sequence[ViewMatches],
    threshold: float,
    title: str | None = None,
) -> Figure:
    """One row per image: query view | key view (equal-sized square uint8 images), a line per match
    (green: geometrically right, red: wrong, grey: not judgeable), more opaque the more similar."""
    n = len(matches)
    size = pairs[0][0].shape[0]
    gap = max(4, size // 16)
    fig = Figure(figsize=(6.0, 3.0 * n + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (query, key), m in zip(axes, pairs, matches):
        canvas = np.full((size, 2 * size + gap, 3), 255, dtype=np.uint8)
        canvas[:, :size] = query
        canvas[:, size + gap :] = key
        ax.imshow(canvas)
        ax.set_axis_off()
        xq, yq = _cell_centres(m.query_cells, m.num_regions, size)
        xk, yk = _cell_centres(m.key_cells, m.num_regions, size)
        xk = xk + size + gap
        for j in range(len(m)):
            if m.correct is None or not bool(m.inside[j]):
                colour = "0.6"
            else:
                colour = "tab:green" if bool(m.correct[j]) else "tab:red"
            alpha = float(
                np.clip(
                    0.35 + 0.65 * (float(m.similarity[j]) - threshold) / max(1e-6, 1 - threshold), 0.35, 1
                )
            )
            ax.plot([xq[j], xk[j]], [yq[j], yk[j]], color=colour, alpha=alpha, linewidth=1.2)
            ax.plot([xq[j], xk[j]], [yq[j], yk[j]], "o", color=colour, markersize=2.5, alpha=alpha)
        precision = m.precision
        right = "n/a" if np.isnan(precision) else f"{precision:.0%} right"
        ax.set_title(f"{len(m)} mutual matches (sim > {threshold:g}), {right}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def correspondence_figure(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    crop_size: int,
    threshold: float = 0.9,
    seed: int = 0,
    title: str | None = None,
) -> tuple[Figure, dict[str, float]]:
    """Two augmented views of each image (seeded, reproducible), their matches, and the figure.

    Returns (figure, summary) with summary = {matches_per_image, match_precision}: the mean number of
    mutual matches above the threshold and the fraction of judgeable ones that are geometrically right.
    The model is put in eval mode (BN running statistics)."""
    if not images:
        raise ValueError("correspondence_figure needs at least one image")
    augment = TwoViewAugmentation(crop_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [augment(image) for image in images]
    views = torch.stack([s[0] for s in samples])
    boxes = torch.stack([s[1] for s in samples])
    flips = torch.stack([s[2] for s in samples])
    was_training = model.training
    model.eval()
    try:
        matches = match_views(model, views, threshold, boxes, flips)
    finally:
        model.train(was_training)
    judged = sum(int(m.inside.sum()) for m in matches)
    right = sum(int(m.correct.sum()) for m in matches)
    summary = {
        "matches_per_image": float(np.mean([len(m) for m in matches])),
        "match_precision": right / judged if judged else float("nan"),
    }
    pairs = [
        tuple(crop_for_display(image, boxes[i, v], bool(flips[i, v]), crop_size) for v in range(2))
        for i, image in enumerate(images)
    ]
    return draw_matches(pairs, matches, threshold, title), summary

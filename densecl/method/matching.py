"""Which key cell is the positive of each query cell: the four strategies, and how often they are right.

Cells are numbered row-major on the SxS grid (p = row * S + col), as `tensor.flatten(2)` orders them.
Crop boxes are (x0, y0, x1, y1) in original-image pixels; a view's flip is applied after its crop.
"""

from __future__ import annotations

import torch


def argmax_match(query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
    """For each query cell, the most cosine-similar key cell: (N, C, P) x (N, C, P) -> (N, P).

    Inputs must already be L2-normalised along C. One-directional, many-to-one, no threshold (as DenseCL).
    """
    sim = torch.bmm(query_feats.transpose(1, 2), key_feats)  # (N, P_query, P_key)
    return sim.argmax(dim=2)


def random_match(batch: int, num_cells: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(num_cells, (batch, num_cells), device=device)


def cell_centres(num_regions: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) of each cell centre in [0, 1] view coordinates, row-major, each of shape (P,)."""
    centres = (torch.arange(num_regions, device=device, dtype=torch.float64) + 0.5) / num_regions
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return u.reshape(-1), v.reshape(-1)


def geometric_match(
    query_boxes: torch.Tensor,
    query_flips: torch.Tensor,
    key_boxes: torch.Tensor,
    key_flips: torch.Tensor,
    num_regions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key cell covering the image point at each query cell's centre, from crop boxes and flips.

    Returns (index (N, P) long, inside (N, P) bool). Where the point lies outside the key crop the nearest
    key cell is returned and `inside` is False.
    """
    qb, kb = query_boxes.double(), key_boxes.double()
    u, v = cell_centres(num_regions, query_boxes.device)
    u = torch.where(query_flips[:, None], 1.0 - u[None], u[None])  # view -> un-flipped crop coordinates
    x = qb[:, 0:1] + u * (qb[:, 2:3] - qb[:, 0:1])
    y = qb[:, 1:2] + v[None] * (qb[:, 3:4] - qb[:, 1:2])
    ku = (x - kb[:, 0:1]) / (kb[:, 2:3] - kb[:, 0:1])
    kv = (y - kb[:, 1:2]) / (kb[:, 3:4] - kb[:, 1:2])
    ku = torch.where(key_flips[:, None], 1.0 - ku, ku)
    inside = (ku >= 0) & (ku <= 1) & (kv >= 0) & (kv <= 1)
    col = (ku * num_regions).floor().clamp(0, num_regions - 1).long()
    row = (kv * num_regions).floor().clamp(0, num_regions - 1).long()
    return row * num_regions + col, inside


def within_one_cell(cells: torch.Tensor, reference: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Whether each cell is at Chebyshev distance <= 1 from its reference cell (row-major indices, S x S)."""
    dr = (cells // num_regions - reference // num_regions).abs()
    dc = (cells % num_regions - reference % num_regions).abs()
    return torch.maximum(dr, dc) <= 1


def correspondence_accuracy(
    chosen: torch.Tensor, geometric: torch.Tensor, inside: torch.Tensor, num_regions: int
) -> torch.Tensor:
    """Fraction of query cells (centre inside both crops) whose chosen key cell is within one cell
    (Chebyshev distance <= 1) of the geometric correspondence; NaN when no cell qualifies."""
    hit = within_one_cell(chosen, geometric, num_regions) & inside
    count = inside.sum()
    if count == 0:
        return torch.tensor(float("nan"), device=chosen.device)
    return hit.sum().float() / count.float()


def chance_correspondence_accuracy(geometric: torch.Tensor, inside: torch.Tensor, num_regions: int) -> torch.Tensor:
    """What correspondence_accuracy would be, in expectation, for a uniformly random key cell, on the same
    crops: the mean share of the S x S grid within one cell of each qualifying query's true match. The
    reference a learned matcher's accuracy must rise above (near 1 for S = 3: the 3x3 neighbourhood covers
    most of the grid); NaN when no cell qualifies."""
    s = num_regions

    def span(index: torch.Tensor) -> torch.Tensor:  # cells within one step along one axis, clipped to the grid
        return (torch.clamp(index + 1, max=s - 1) - torch.clamp(index - 1, min=0) + 1).float()

    share = span(geometric // s) * span(geometric % s) / float(s * s)
    count = inside.sum()
    if count == 0:
        return torch.tensor(float("nan"), device=geometric.device)
    return (share * inside).sum() / count.float()

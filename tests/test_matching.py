"""Matchers on hand-built cases, and correspondence accuracy."""

import pytest
import torch
import torch.nn.functional as F

from densecl.method.matching import (
    argmax_match,
    cell_centres,
    chance_correspondence_accuracy,
    correspondence_accuracy,
    geometric_match,
    random_match,
)

GRID_SIZES = [1, 3, 5, 7, 9]


def mirror_columns(index, s):
    return (index // s) * s + (s - 1 - index % s)


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("s", GRID_SIZES)
def test_geometric_identical_crops_give_identity(s):
    b = boxes([10, 20, 110, 140], [0, 0, 50, 50])
    idx, inside = geometric_match(b, torch.tensor([False, True]), b, torch.tensor([False, True]), s)
    assert torch.equal(idx, torch.arange(s * s).expand(2, -1))
    assert inside.all()


@pytest.mark.parametrize("s", GRID_SIZES)
def test_geometric_flip_gives_mirrored_columns(s):
    b = boxes([5, 5, 69, 69])
    idx, inside = geometric_match(b, torch.tensor([False]), b, torch.tensor([True]), s)
    assert torch.equal(idx[0], mirror_columns(torch.arange(s * s), s))
    assert inside.all()


def test_geometric_shifted_and_scaled_crops():
    # query = left half of a 100x100 image, key = the whole image, 2x2 grid
    idx, inside = geometric_match(
        boxes([0, 0, 50, 100]), torch.tensor([False]), boxes([0, 0, 100, 100]), torch.tensor([False]), 2
    )
    # query cell centres at x = 12.5, 37.5 -> key column 0 both; rows stay
    assert idx[0].tolist() == [0, 0, 2, 2]
    assert inside.all()


def test_geometric_outside_key_crop_gives_nearest_cell_and_flags_it():
    idx, inside = geometric_match(
        boxes([0, 0, 100, 100]), torch.tensor([False]), boxes([0, 0, 50, 100]), torch.tensor([False]), 2
    )
    # query column centres x = 25 (key column 1 of the 50-wide crop) and x = 75: outside the key crop,
    # whose nearest column is the last one
    assert inside[0].tolist() == [True, False, True, False]
    assert idx[0].tolist() == [1, 1, 3, 3]


def test_cell_centres_row_major():
    u, v = cell_centres(2)
    assert u.tolist() == [0.25, 0.75, 0.25, 0.75]
    assert v.tolist() == [0.25, 0.25, 0.75, 0.75]


@pytest.mark.parametrize("s", GRID_SIZES)
def test_argmax_identical_features_give_identity(s):
    feats = F.normalize(torch.randn(2, 16, s * s), dim=1)
    assert torch.equal(argmax_match(feats, feats), torch.arange(s * s).expand(2, -1))


@pytest.mark.parametrize("s", [3, 5, 7, 9])
def test_argmax_mirrored_features_give_mirrored_columns(s):
    feats = F.normalize(torch.randn(1, 32, s, s), dim=1)
    mirrored = feats.flip(-1)
    assert torch.equal(argmax_match(feats.flatten(2), mirrored.flatten(2))[0], mirror_columns(torch.arange(s * s), s))


def test_argmax_picks_a_planted_maximum():
    torch.manual_seed(0)
    query = F.normalize(torch.randn(1, 64, 9), dim=1)
    key = F.normalize(torch.randn(1, 64, 9), dim=1)
    key[0, :, 6] = query[0, :, 2]  # the exact copy has cosine 1, every other pair < 1
    assert argmax_match(query, key)[0, 2].item() == 6


def test_random_match_range_and_spread():
    torch.manual_seed(0)
    idx = random_match(64, 25)
    assert idx.shape == (64, 25) and idx.min() >= 0 and idx.max() < 25
    assert len(idx.unique()) == 25


def test_correspondence_accuracy_counts_within_one_cell_inside_only():
    s = 3
    geo = torch.tensor([[0, 4, 8]])
    inside = torch.tensor([[True, True, False]])
    chosen = torch.tensor([[4, 2, 0]])  # 0->4: diagonal neighbour (hit); 4->2: one row, one col (hit); 3rd ignored
    assert correspondence_accuracy(chosen, geo, inside, s).item() == pytest.approx(1.0)
    chosen = torch.tensor([[8, 4, 0]])  # 0 vs 8: two cells away (miss)
    assert correspondence_accuracy(chosen, geo, inside, s).item() == pytest.approx(0.5)
    assert torch.isnan(correspondence_accuracy(chosen, geo, torch.zeros_like(inside), s))


def test_correspondence_accuracy_brute_force():
    torch.manual_seed(1)
    s = 5
    chosen, geo = torch.randint(25, (4, 25)), torch.randint(25, (4, 25))
    inside = torch.rand(4, 25) > 0.3
    hits = total = 0
    for n in range(4):
        for p in range(25):
            if inside[n, p]:
                total += 1
                (r1, c1), (r2, c2) = divmod(int(chosen[n, p]), s), divmod(int(geo[n, p]), s)
                hits += max(abs(r1 - r2), abs(c1 - c2)) <= 1
    assert correspondence_accuracy(chosen, geo, inside, s).item() == pytest.approx(hits / total)


@pytest.mark.parametrize("s", [1, 3, 5])
def test_chance_accuracy_is_the_mean_over_every_possible_choice(s):
    torch.manual_seed(2)
    cells = s * s
    geo = torch.randint(cells, (3, cells))
    inside = torch.rand(3, cells) > 0.3
    inside[0, 0] = True
    per_choice = [correspondence_accuracy(torch.full_like(geo, c), geo, inside, s) for c in range(cells)]
    # every query drawing its key cell uniformly = the mean over the S^2 ways all queries pick the same cell
    assert chance_correspondence_accuracy(geo, inside, s).item() == pytest.approx(torch.stack(per_choice).mean().item())
    assert torch.isnan(chance_correspondence_accuracy(geo, torch.zeros_like(inside), s))

"""densecl.evaluation.correspondence_figure: mutual nearest neighbours above a threshold, judged against the crop
geometry."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densecl.data.synthetic import generate_scene
from densecl.evaluation import correspondence_figure as visualize


def test_mutual_nearest_neighbours_keep_only_mutual_pairs_above_threshold():
    # 4 cells, 3-dim features. Query cells 0 and 1 both prefer key cell 0; key cell 0 prefers query 0.
    query = F.normalize(torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]]).T, dim=0)
    key = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0.05], [0.5, 0.5, 0.5]]).T, dim=0)
    q, k, sim = visualize.mutual_nearest_neighbours(query, key, threshold=0.5)
    assert q.tolist() == [0, 2, 3] and k.tolist() == [0, 2, 1]
    assert torch.allclose(sim, (query.T @ key)[q, k])
    q, _, _ = visualize.mutual_nearest_neighbours(query, key, threshold=0.999)
    assert q.tolist() == [0, 3]


class PixelFeatures(torch.nn.Module):
    """A stand-in model whose dense features are the pooled pixels: identical views match everywhere."""

    def __init__(self, regions: int):
        super().__init__()
        self.regions = regions
        self.scale = torch.nn.Parameter(torch.ones(()))

    def extract_dense(self, images):
        grid = F.adaptive_avg_pool2d(images, self.regions)
        coords = torch.stack(
            torch.meshgrid(torch.arange(self.regions), torch.arange(self.regions), indexing="ij")
        )
        feats = torch.cat([grid, coords[None].float().expand(len(images), -1, -1, -1) * 10], dim=1)
        return F.normalize(feats * self.scale, dim=1)


def test_identical_views_match_every_cell_correctly():
    views = torch.randn(2, 1, 3, 64, 64).expand(-1, 2, -1, -1, -1).contiguous()
    boxes = torch.tensor([[0.0, 0, 64, 64], [0, 0, 64, 64]]).expand(2, -1, -1)
    flips = torch.zeros(2, 2, dtype=torch.bool)
    matches = visualize.match_views(PixelFeatures(4), views, threshold=0.99, boxes=boxes, flips=flips)
    for m in matches:
        assert len(m) == 16 and m.query_cells.tolist() == m.key_cells.tolist()
        assert m.precision == 1.0


def test_a_flipped_view_is_judged_wrong_when_matched_unflipped():
    views = torch.randn(1, 1, 3, 64, 64).expand(-1, 2, -1, -1, -1).contiguous()
    boxes = torch.tensor([[[0.0, 0, 64, 64], [0, 0, 64, 64]]])
    flips = torch.tensor([[False, True]])  # geometry says mirrored, the features say identical
    (m,) = visualize.match_views(PixelFeatures(4), views, threshold=0.99, boxes=boxes, flips=flips)
    assert len(m) == 16 and m.precision == 0.5  # columns 1 and 2 land within one cell of their mirror


def test_crop_for_display_follows_box_and_flip():
    image = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (100, 1))[..., None].repeat(3, axis=2))
    crop = visualize.crop_for_display(image, torch.tensor([50.0, 0, 100, 100]), flip=False, size=10)
    flipped = visualize.crop_for_display(image, torch.tensor([50.0, 0, 100, 100]), flip=True, size=10)
    assert crop.shape == (10, 10, 3) and crop[0, 0, 0] >= 50
    assert np.array_equal(flipped, crop[:, ::-1])


def test_correspondence_figure_of_a_real_model(tmp_path):
    from densecl.method.model import DenseCL

    torch.manual_seed(0)
    model = DenseCL(arch="resnet18", queue_len=64, num_regions=4).train()
    images = [generate_scene(0, i, 96).image for i in range(2)]
    figure, summary = visualize.correspondence_figure(model, images, crop_size=64, threshold=0.0, seed=1)
    assert model.training  # mode restored
    assert set(summary) == {"matches_per_image", "match_precision"}
    assert 1 <= summary["matches_per_image"] <= 16
    again = visualize.correspondence_figure(model, images, crop_size=64, threshold=0.0, seed=1)[1]
    assert again["matches_per_image"] == summary["matches_per_image"]  # seeded views
    figure.savefig(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 5000

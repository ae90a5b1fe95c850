"""Did pre-training learn its own task? Top-1 retrieval of each scene's second augmented view among the first
views of N held-out synthetic scenes, on the frozen backbone's average-pooled C5 features.

Instance discrimination is what MoCo v2 and DenseCL's global branch train for. A backbone that has learned it
finds the other view of a scene far more often than a random network does; one that has not stays near the
random network, and then a probe or a fine-tuning cannot be expected to rank it above random init.
Usage: python benchmarks/view_retrieval.py random:0 outputs/.../pretrain/backbone.pth [...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from densecl.data.augment import TwoViewAugmentation
from densecl.data.synthetic import VAL_INDEX_OFFSET, generate_scene
from densecl.evaluation.probe import extract, load_frozen_backbone

# Held out from pre-training (indices 0..num_images-1) and from the probe's and the downstream val sets.
FIRST_SCENE = 2 * VAL_INDEX_OFFSET


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+", help="exported backbone files, or random:SEED for random init")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--scenes", type=int, default=512, help="number of scenes (candidates per query)")
    parser.add_argument("--crop", type=int, default=96, help="view size, as in pre-training")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic scenes")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--view-seed", type=int, default=0, help="seed of the augmentations")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def make_views(num_scenes: int, crop: int, image_size: int, data_seed: int, view_seed: int):
    """Two augmented views of each held-out scene, drawn with pre-training's two-view augmentation."""
    augment = TwoViewAugmentation(crop)
    first, second = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed)
        for i in range(num_scenes):
            views, _, _ = augment(generate_scene(data_seed, FIRST_SCENE + i, image_size).image)
            first.append(views[0])
            second.append(views[1])
    return torch.stack(first), torch.stack(second)


def pooled_features(trunk: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(extract(trunk, images, "c5", torch.device("cpu")).mean(dim=(2, 3)), dim=1)


def view_retrieval(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """first, second: (N, D) L2-normalised features of the two views, row i from scene i."""
    similarity = first @ second.T
    hits = similarity.argmax(dim=1) == torch.arange(len(first))
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return {
        "top1": hits.float().mean().item(),
        "positive_cos": similarity.diagonal().mean().item(),
        "negative_cos": (off_diagonal / (similarity.numel() - len(first))).item(),
    }


def load(arch: str, name: str) -> torch.nn.Module:
    if name.startswith("random:"):
        return load_frozen_backbone(arch, None, seed=int(name.split(":", 1)[1]))
    return load_frozen_backbone(arch, name)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    first, second = make_views(args.scenes, args.crop, args.image_size, args.data_seed, args.view_seed)
    print(f"{args.scenes} held-out scenes at {args.image_size} px, views at {args.crop} px; "
          f"chance top-1 {1 / args.scenes:.4f}")
    for name in args.backbones:
        trunk = load(args.arch, name)
        scores = view_retrieval(pooled_features(trunk, first), pooled_features(trunk, second))
        print(f"{name}: view top-1 {scores['top1']:.4f}, positive cos {scores['positive_cos']:.3f}, "
              f"negative cos {scores['negative_cos']:.3f}")


if __name__ == "__main__":
    main()

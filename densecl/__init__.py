"""DenseCL: dense contrastive learning for self-supervised visual pre-training (Wang et al., CVPR 2021)."""

__version__ = "0.1.0"

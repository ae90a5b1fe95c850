"""Judging features without fine-tuning: segmentation metrics, linear probes, k-NN, correspondences."""

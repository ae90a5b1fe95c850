"""DenseCL: dense contrastive learning for self-supervised visual pre-training (Wang et al., CVPR 2021).

The library, by concern; a room imports only the top-level modules and the rooms listed before it
(tests/test_layout.py):

    method      DenseCL and MoCo v2 in one model: backbone, heads, losses, matching, split BN
    data        unlabelled images and their two views: synthetic scenes, image folders, augmentation
    weights     backbone weights in and out: export, published layouts, detectron2 conversion
    evaluation  features judged without fine-tuning: metrics, linear probe and classifier, k-NN signals
    training    pre-training: the run, the step loop and its hooks, optimiser, checkpoints
    transfer    fine-tuning on detectron2: stage settings and protocols, data sets, detection, segmentation

Top level: typed_settings (errors, field roles, conversions), files (atomic writes), resume (the rule for
reusing a folder), distributed (devices and processes). Each room's settings live in its `settings` module.
"""

__version__ = "0.1.0"

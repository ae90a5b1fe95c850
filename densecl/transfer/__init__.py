"""Fine-tuning on detectron2 (docs/detectron2.md): stage settings and protocols, data sets, detection and
segmentation. Importing this package imports neither detectron2 nor torch: the stage settings
(densecl.transfer.settings) and data-set layout checks (densecl.transfer.layouts) are composed and checked in
the launching process; the stage modules (runner, detection, segmentation, catalog, pretrained) import detectron2.
"""

"""Downstream transfer on detectron2 (docs/detectron2.md): weight conversion, VOC / COCO detection and FCN
segmentation. Importing this package imports neither detectron2 nor torch: the stage configs
(densecl.transfer.configs) and data-set layout checks (densecl.transfer.layouts) are composed and checked in
the launching process; the stage modules (engine, detection, segmentation, data, weights) import detectron2.
"""

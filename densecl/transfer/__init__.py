"""Downstream transfer on detectron2: weight conversion, VOC / COCO detection and FCN segmentation.

Importing this package does not import detectron2 (install it with scripts/install_detectron2.sh); the
stage modules import it when used. Modules, one job each:
    convert       backbone weights -> detectron2 .pkl            convert_to_detectron2(src, dst) -> Path
    weights       resolve starting weights, strict loading        prepare_weights, load_pretrained
    data          data-set registration and layout checks         register_datasets(names, data_root, synthetic_root)
    engine        shared stage config, trainer, resume, metrics   StageConfig, run_stage
    detection     VOC Faster R-CNN C4, COCO Mask R-CNN FPN        run_voc_detection, run_coco_detection
    segmentation  dilated-ResNet FCN, mIoU evaluator              run_semantic_segmentation
See docs/detectron2.md for the protocols and what the registry build of detectron2 lacks.
"""

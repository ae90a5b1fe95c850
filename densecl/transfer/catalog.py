"""The transfer stages' data sets in detectron2's catalogs, registered only after every file they list was
found (densecl.transfer.layouts), so that no training starts on a broken layout."""

from __future__ import annotations

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.pascal_voc import register_pascal_voc

from densecl.transfer.layouts import IGNORE_LABEL, dataset_kind, resolve_dataset


def class_names(name: str) -> list[str]:
    """Classes of a registered set: thing classes for detection, stuff classes (incl. background) for sem_seg."""
    meta = MetadataCatalog.get(name)
    return list(meta.stuff_classes if dataset_kind(name) == "sem_seg" else meta.thing_classes)


def register_datasets(names, data_root=None, synthetic_root=None, custom_root=None) -> None:
    """Check every set first, then (re-)register them all; raises DatasetLayoutError naming a missing path."""
    resolved = {name: resolve_dataset(name, data_root, synthetic_root, custom_root) for name in dict.fromkeys(names)}
    for name, info in resolved.items():
        if name in DatasetCatalog.list():  # detectron2 pre-registers builtin names under its own root
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if info["kind"] == "voc":
            register_pascal_voc(name, str(info["dirname"]), info["split"], info["year"], list(info["classes"]))
        elif info["kind"] == "coco":
            metadata = info["metadata"] if info["metadata"] is not None else _get_builtin_metadata("coco")
            register_coco_instances(name, metadata, str(info["json_file"]), str(info["image_root"]))
        else:
            records = info["records"]
            DatasetCatalog.register(name, lambda records=records: [dict(r) for r in records])
            MetadataCatalog.get(name).set(
                stuff_classes=list(info["classes"]), ignore_label=info.get("ignore_label", IGNORE_LABEL),
                evaluator_type="sem_seg",
            )

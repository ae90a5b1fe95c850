"""Where the transfer stages' data sets live and what their folders must hold: checked before anything is
built or trained, so that a missing file fails in seconds, naming the path and the expected layout. No
detectron2 (the pipeline checks data paths while composing configs); densecl.transfer.catalog registers the
checked sets with detectron2.

Real sets live under one root (`data_root`, default $DETECTRON2_DATASETS or ./datasets) in detectron2's layout
(_LAYOUT below; VOC12 "train_aug" labels come from mmseg's tools/convert_datasets/voc_aug.py, Cityscapes'
labelTrainIds from cityscapesscripts' createTrainIdLabelImgs.py). The synthetic set
(densecl.data.synthetic.write_synthetic_dataset) registers as synthetic_{voc,coco,seg}_{train,val} from
`synthetic_root`; its semantic labels are 0 = background, class c -> c + 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from densecl.data.synthetic import CLASS_NAMES
from densecl.data.voc import VOC_CLASSES
from densecl.evaluation.metrics import IGNORE_INDEX
from densecl.transfer.custom import DATASET_FILE, TRAIN_RECORDS, VAL_RECORDS

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
IGNORE_LABEL = IGNORE_INDEX


class DatasetLayoutError(FileNotFoundError):
    """A data set's folder or file is missing; the message names it and the expected layout."""


@dataclass(frozen=True)
class _Spec:
    kind: str  # "voc", "coco" or "sem_seg"
    synthetic: bool
    args: tuple


_VOC_DET = {
    f"voc_{year}_{split}": _Spec("voc", False, (f"VOC{year}", split, year))
    for year, splits in ((2007, ("trainval", "train", "val", "test")), (2012, ("trainval", "train", "val")))
    for split in splits
}
_COCO = {
    f"coco_2017_{split}": _Spec("coco", False, (f"coco/{split}2017", f"coco/annotations/instances_{split}2017.json"))
    for split in ("train", "val")
}
_SEM_SEG = {
    "voc_2012_sem_seg_train_aug": _Spec("sem_seg", False, ("voc", "train_aug")),
    "voc_2012_sem_seg_val": _Spec("sem_seg", False, ("voc", "val")),
    "cityscapes_fine_sem_seg_train": _Spec("sem_seg", False, ("cityscapes", "train")),
    "cityscapes_fine_sem_seg_val": _Spec("sem_seg", False, ("cityscapes", "val")),
}
_SYNTHETIC = {
    f"synthetic_{kind}_{split}": _Spec({"seg": "sem_seg"}.get(kind, kind), True, (split,))
    for kind in ("voc", "coco", "seg")
    for split in ("train", "val")
}
# The user's own labelled set (densecl.transfer.custom), checked and written into the stage's folder first.
_CUSTOM = {
    f"custom_{kind}_{split}": _Spec({"seg": "sem_seg"}.get(kind, "coco"), False, (split,))
    for kind in ("det", "seg")
    for split in ("train", "val")
}
_ALL = {**_VOC_DET, **_COCO, **_SEM_SEG, **_SYNTHETIC, **_CUSTOM}
KNOWN_DATASETS = tuple(_ALL)

_LAYOUT = {
    "voc": "VOC20XX/{Annotations/ID.xml, JPEGImages/ID.jpg, ImageSets/Main/SPLIT.txt}",
    "coco": "coco/{annotations/instances_SPLIT2017.json, SPLIT2017/*.jpg}",
    "voc_seg": "VOC2012/{JPEGImages/ID.jpg, SegmentationClass/ID.png, SegmentationClassAug/ID.png, "
    "ImageSets/Segmentation/{val.txt, train.txt + aug.txt (or train_aug.txt)}}",
    "cityscapes": "cityscapes/{leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png}",
    "custom": "written by densecl.transfer.custom.prepare(dataset, folder): dataset.json, train.json, val.json",
    "synthetic": "written by densecl.data.synthetic.write_synthetic_dataset(root, num_train, num_val): "
    "meta.json, voc/{JPEGImages,Annotations,SegmentationClass,ImageSets}, coco/annotations/instances_SPLIT.json",
}


def _spec(name: str) -> _Spec:
    if name not in _ALL:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    return _ALL[name]


def dataset_kind(name: str) -> str:
    return _spec(name).kind


def default_data_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def _need(path: Path, layout: str, what: str = "") -> Path:
    if not path.exists():
        raise DatasetLayoutError(
            f"data set file or folder missing: {path}{what}; expected layout under the root: {_LAYOUT[layout]}"
        )
    return path


def _read_ids(list_file: Path, layout: str) -> list[str]:
    ids = [line.split()[0] for line in _need(list_file, layout).read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"{list_file} lists no images; expected one image id per line")
    return ids


def _check_files(paths: list[Path], layout: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(paths)} files listed by the data set are missing, e.g. {missing[0]}; "
            f"expected layout: {_LAYOUT[layout]}"
        )


# ----------------------------------------------------------------------------------------- file lists
def _voc_det_files(dirname: Path, split: str, layout: str) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        _need(dirname / sub, layout)
    ids = _read_ids(dirname / "ImageSets" / "Main" / f"{split}.txt", layout)
    _check_files(
        [dirname / "Annotations" / f"{i}.xml" for i in ids] + [dirname / "JPEGImages" / f"{i}.jpg" for i in ids], layout
    )


def _voc_seg_records(voc2012: Path, split: str) -> list[dict]:
    """val: val.txt with SegmentationClass labels. train_aug: mmseg's two concatenated sets
    (configs/_base_/datasets/pascal_voc12_aug.py): train.txt with VOC's own labels from SegmentationClass,
    then aug.txt with SBD's from SegmentationClassAug. mmseg's tools/convert_datasets/voc_aug.py writes
    aug.txt as the SBD ids minus VOC train and val, so no id is in both lists; one that is anyway (a
    hand-made aug.txt) is kept once, from train.txt, where mmseg would train it twice."""
    seg_lists = voc2012 / "ImageSets" / "Segmentation"
    _need(voc2012 / "JPEGImages", "voc_seg")
    if split == "val":
        pairs = [(i, "SegmentationClass") for i in _read_ids(seg_lists / "val.txt", "voc_seg")]
    elif (seg_lists / "aug.txt").is_file() or not (seg_lists / "train_aug.txt").is_file():  # neither: asks for aug.txt
        train = _read_ids(seg_lists / "train.txt", "voc_seg")
        aug = _read_ids(_need(seg_lists / "aug.txt", "voc_seg", " (and no train_aug.txt)"), "voc_seg")
        in_train = set(train)
        pairs = [(i, "SegmentationClass") for i in train]
        pairs += [(i, "SegmentationClassAug") for i in dict.fromkeys(aug) if i not in in_train]
    else:
        # No aug.txt, a train_aug.txt list (DeepLab's 10582 ids): the ids of train.txt, when there is one,
        # take SegmentationClass's labels, every other id SegmentationClassAug's, the labels mmseg's split
        # gives. Without train.txt every id takes SegmentationClassAug's: the folder such a list ships with
        # (a label for each of its ids), and nothing else tells VOC's own train images apart.
        train = set(_read_ids(seg_lists / "train.txt", "voc_seg")) if (seg_lists / "train.txt").is_file() else set()
        pairs = [
            (i, "SegmentationClass" if i in train else "SegmentationClassAug")
            for i in _read_ids(seg_lists / "train_aug.txt", "voc_seg")
        ]
    for folder in dict.fromkeys(f for _, f in pairs):
        _need(voc2012 / folder, "voc_seg")
    records = []
    for i, folder in pairs:
        label = voc2012 / folder / f"{i}.png"
        records.append(
            {"file_name": str(voc2012 / "JPEGImages" / f"{i}.jpg"), "sem_seg_file_name": str(label), "image_id": i}
        )
    _check_files([Path(r[k]) for r in records for k in ("file_name", "sem_seg_file_name")], "voc_seg")
    return records


def _cityscapes_records(root: Path, split: str) -> list[dict]:
    image_dir = _need(root / "cityscapes" / "leftImg8bit" / split, "cityscapes")
    gt_dir = _need(root / "cityscapes" / "gtFine" / split, "cityscapes")
    records = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("leftImg8bit.png")]
        label = gt_dir / image.parent.name / f"{stem}gtFine_labelTrainIds.png"
        records.append({"file_name": str(image), "sem_seg_file_name": str(label), "image_id": image.stem})
    if not records:
        raise DatasetLayoutError(f"no *_leftImg8bit.png images under {image_dir}; expected {_LAYOUT['cityscapes']}")
    _check_files([Path(r["sem_seg_file_name"]) for r in records], "cityscapes")
    return records


def _synthetic_root(synthetic_root: str | os.PathLike | None) -> Path:
    if not synthetic_root:
        raise DatasetLayoutError(f"a synthetic data set needs synthetic_root; it is {_LAYOUT['synthetic']}")
    root = Path(synthetic_root)
    _need(root / "meta.json", "synthetic")
    return root


def _synthetic_seg_records(root: Path, split: str) -> list[dict]:
    voc = root / "voc"
    ids = _read_ids(voc / "ImageSets" / "Segmentation" / f"{split}.txt", "synthetic")
    records = [
        {
            "file_name": str(voc / "JPEGImages" / f"{i}.jpg"),
            "sem_seg_file_name": str(voc / "SegmentationClass" / f"{i}.png"),
            "image_id": i,
        }
        for i in ids
    ]
    _check_files([Path(r[k]) for r in records for k in ("file_name", "sem_seg_file_name")], "synthetic")
    return records


# ------------------------------------------------------------------------------------------- check
def is_custom(name: str) -> bool:
    return name in _CUSTOM


def _custom_dataset(folder, split: str, kind: str) -> dict:
    if not folder:
        raise DatasetLayoutError(f"a custom data set needs the folder it was prepared in; it is {_LAYOUT['custom']}")
    folder = Path(folder)
    info = json.loads(_need(folder / DATASET_FILE, "custom").read_text())
    records = _need(folder / {"train": TRAIN_RECORDS, "val": VAL_RECORDS}[split], "custom")
    if kind == "coco":
        metadata = {"thing_classes": info["classes"], "has_masks": info["has_masks"],
                    "mask_format": info["mask_format"]}
        return {"kind": "coco", "json_file": records, "image_root": Path(""), "metadata": metadata}
    return {"kind": "sem_seg", "records": json.loads(records.read_text()), "classes": tuple(info["classes"]),
            "ignore_label": info["ignore_label"]}


def resolve_dataset(name: str, data_root=None, synthetic_root=None, custom_root=None) -> dict:
    """Check the set's files and return what registration needs (densecl.transfer.catalog); raises
    DatasetLayoutError naming the missing path, KeyError for an unknown name. `custom_root`: the folder
    densecl.transfer.custom.prepare wrote the user's set into."""
    spec = _spec(name)
    if is_custom(name):
        return _custom_dataset(custom_root, spec.args[0], spec.kind)
    if spec.synthetic:
        root = _synthetic_root(synthetic_root)
        classes = tuple(json.loads((root / "meta.json").read_text()).get("class_names", CLASS_NAMES))
        split = spec.args[0]
        if spec.kind == "voc":
            _voc_det_files(root / "voc", split, "synthetic")
            return {"kind": "voc", "dirname": root / "voc", "split": split, "year": 2007, "classes": classes}
        if spec.kind == "coco":
            json_file = _need(root / "coco" / "annotations" / f"instances_{split}.json", "synthetic")
            categories = sorted(json.loads(json_file.read_text())["categories"], key=lambda c: c["id"])
            return {
                "kind": "coco",
                "json_file": json_file,
                "image_root": _need(root / "voc" / "JPEGImages", "synthetic"),
                "metadata": {"thing_classes": [c["name"] for c in categories]},
            }
        return {"kind": "sem_seg", "records": _synthetic_seg_records(root, split), "classes": ("background", *classes)}

    root = Path(data_root or default_data_root())
    if spec.kind == "voc":
        dirname, split, year = spec.args
        _voc_det_files(_need(root / dirname, "voc"), split, "voc")
        return {"kind": "voc", "dirname": root / dirname, "split": split, "year": year, "classes": VOC_CLASSES}
    if spec.kind == "coco":
        image_dir, json_file = spec.args
        return {
            "kind": "coco",
            "json_file": _need(root / json_file, "coco"),
            "image_root": _need(root / image_dir, "coco"),
            "metadata": None,  # detectron2's builtin COCO metadata, at registration
        }
    family, split = spec.args
    if family == "voc":
        records = _voc_seg_records(_need(root / "VOC2012", "voc_seg"), split)
        return {"kind": "sem_seg", "records": records, "classes": ("background", *VOC_CLASSES)}
    return {"kind": "sem_seg", "records": _cityscapes_records(root, split), "classes": CITYSCAPES_CLASSES}


def check_dataset(name: str, data_root=None, synthetic_root=None, custom_root=None) -> None:
    """`resolve_dataset`'s checks alone."""
    resolve_dataset(name, data_root, synthetic_root, custom_root)


def count_images(name: str, data_root=None) -> int:
    """How many images a real data set lists (read from its lists, or its image folder for COCO), without
    checking each file: what a plan shows. Raises DatasetLayoutError naming a missing list or folder."""
    spec = _spec(name)
    root = Path(data_root or default_data_root())
    if spec.kind == "voc":
        dirname, split, _ = spec.args
        return len(_read_ids(root / dirname / "ImageSets" / "Main" / f"{split}.txt", "voc"))
    if spec.kind == "coco":
        return sum(1 for _ in _need(root / spec.args[0], "coco").iterdir())
    family, split = spec.args
    if family == "voc":
        seg_lists = root / "VOC2012" / "ImageSets" / "Segmentation"
        if split == "val":
            return len(_read_ids(seg_lists / "val.txt", "voc_seg"))
        if (seg_lists / "train_aug.txt").is_file() and not (seg_lists / "aug.txt").is_file():
            return len(_read_ids(seg_lists / "train_aug.txt", "voc_seg"))
        train, aug = (set(_read_ids(seg_lists / f"{name}.txt", "voc_seg")) for name in ("train", "aug"))
        return len(train | aug)
    return sum(1 for _ in _need(root / "cityscapes" / "leftImg8bit" / split, "cityscapes").glob("*/*_leftImg8bit.png"))

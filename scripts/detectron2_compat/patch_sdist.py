"""Apply densecl's compatibility fixes to an unpacked pb1-detectron2==0.6 sdist (= detectron2 v0.6).

Usage: python patch_sdist.py SDIST_DIR

Why each fix (see docs/detectron2.md):
- setup.py: the sdist lacks detectron2/layers/csrc, so the C++ extension cannot be built; the `all` extra's
  direct-URL dependency (panopticapi) is rejected by current pip.
- configs/: setup.py ships the model-zoo YAMLs only from a top-level configs/ folder.
- Pillow >= 10 removed Image.LINEAR; setuptools >= 81 removed pkg_resources; numpy >= 1.24 removed the
  np.int/np.float/np.str/np.object aliases (np.bool is back in numpy 2 but means np.bool_).
- detectron2/_C.py: our pure-Python stand-in for the compiled extension (see _C.py).
Every fix must match the expected number of times: a different sdist fails loudly instead of installing
half-patched.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (relative file, old text, new text, expected number of occurrences)
TEXT_FIXES: list[tuple[str, str, str, int]] = [
    ("setup.py", "    ext_modules=get_extensions(),\n", "", 1),
    ("setup.py", '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n', "", 1),
    ("setup.py", '            "panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",\n', "", 1),
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1),
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    ),
]

# numpy aliases removed in numpy 1.24 (np.bool returned in 2.0 as np.bool_; use the builtin everywhere).
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|bool|str|object)\b(?![\w.])")
NUMPY_ALIAS_FILES = {
    "detectron2/evaluation/pascal_voc_evaluation.py": 2,  # one in a comment
    "detectron2/evaluation/sem_seg_evaluation.py": 7,
    "detectron2/structures/masks.py": 3,
    "detectron2/data/datasets/pascal_voc.py": 1,
    "detectron2/data/build.py": 2,
    "detectron2/utils/visualizer.py": 3,
    "detectron2/utils/video_visualizer.py": 1,
}


def patch(root: Path) -> None:
    if not (root / "setup.py").is_file() or not (root / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"{root}: not an unpacked detectron2 sdist (expected setup.py and detectron2/__init__.py)")
    for rel, old, new, expected in TEXT_FIXES:
        path = root / rel
        text = path.read_text()
        found = text.count(old)
        if found != expected:
            raise SystemExit(f"{path}: expected {expected} occurrence(s) of {old!r}, found {found}")
        path.write_text(text.replace(old, new))

    for rel, expected in NUMPY_ALIAS_FILES.items():
        path = root / rel
        text, found = NUMPY_ALIAS.subn(lambda m: m.group(1), path.read_text())
        if found != expected:
            raise SystemExit(f"{path}: expected {expected} removed numpy alias(es), found {found}")
        path.write_text(text)
    leftover = [
        f"{p.relative_to(root)}:{i}"
        for p in sorted((root / "detectron2").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if NUMPY_ALIAS.search(line)
    ]
    if leftover:
        raise SystemExit(f"numpy aliases left unpatched at {leftover}")

    configs_src, configs_dst = root / "detectron2" / "model_zoo" / "configs", root / "configs"
    if not configs_dst.is_dir():
        if not configs_src.is_dir():
            raise SystemExit(f"{configs_src}: model-zoo configs missing from the sdist")
        shutil.copytree(configs_src, configs_dst)

    stand_in = root / "detectron2" / "_C.py"
    if any((root / "detectron2").glob("_C*.so")):
        raise SystemExit(f"{root}/detectron2 already holds a compiled _C: refusing to shadow it")
    shutil.copyfile(HERE / "_C.py", stand_in)
    print(f"patched {root}: {len(TEXT_FIXES)} text fixes, numpy aliases, configs/, detectron2/_C.py stand-in")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    patch(Path(sys.argv[1]))

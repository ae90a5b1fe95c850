"""Report the state of detectron2 in this environment, for scripts/install_detectron2.sh.

Prints one word and exits 0: `official` (a working build with a compiled _C: leave it alone), `current`
(our patched build at the current patch level), `outdated` (our build, older patch level), `missing`
(not importable), or `broken` (importable but failing; the reason follows on stderr).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "_C.py"


def wanted_patch_level() -> int:
    match = re.search(r"^DENSECL_PATCH_LEVEL = (\d+)$", STANDIN.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{STANDIN}: no DENSECL_PATCH_LEVEL line")
    return int(match.group(1))


def main() -> str:
    if importlib.util.find_spec("detectron2") is None:
        return "missing"
    try:
        for name in ("detectron2.modeling", "detectron2.data", "detectron2.engine", "detectron2.evaluation"):
            importlib.import_module(name)
        from detectron2 import _C, model_zoo

        model_zoo.get_config_file("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml")
    except Exception:
        traceback.print_exc()
        return "broken"
    if not getattr(_C, "DENSECL_STANDIN", False):
        return "official"
    return "current" if getattr(_C, "DENSECL_PATCH_LEVEL", 0) == wanted_patch_level() else "outdated"


if __name__ == "__main__":
    print(main())
    sys.exit(0)

#!/usr/bin/env bash
# Install detectron2 into the active Python environment from the package registry alone.
#
# The name `detectron2` is not on PyPI; `pb1-detectron2==0.6` is detectron2 v0.6's source packaged without
# the C++ sources of detectron2._C. This script downloads that sdist, checks its pinned sha256, applies
# densecl's compatibility fixes (scripts/detectron2_compat/patch_sdist.py), installs it without the C++
# extension and with our pure-Python stand-in for detectron2._C (rotated boxes, deformable convolution and
# the fast COCOeval raise an error saying so). See docs/detectron2.md.
#
# Idempotent: exits at once when a working official detectron2 (compiled _C) or our current build is
# installed. DETECTRON2_FORCE_REINSTALL=1 rebuilds ours; DETECTRON2_SDIST=/path/to/sdist avoids the download;
# DETECTRON2_PYTHON picks another interpreter than `python`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
COMPAT="$HERE/detectron2_compat"
PY=${DETECTRON2_PYTHON:-python}  # the active environment's python (setup.sh activates .venv)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

state=$("$PY" "$COMPAT/check_install.py" 2>"$WORK/check.log" || echo broken)
case "$state" in
  official)
    echo "detectron2: a working official build is installed; leaving it alone"
    exit 0 ;;
  current)
    if [ "${DETECTRON2_FORCE_REINSTALL:-0}" != 1 ]; then
      echo "detectron2: densecl's patched build is installed and current"
      exit 0
    fi ;;
  broken)
    if ! "$PY" -m pip show -q pb1-detectron2 >/dev/null 2>&1; then
      cat "$WORK/check.log" >&2
      echo "detectron2 is installed but fails to import, and it is not densecl's build (pb1-detectron2)." >&2
      echo "Repair or uninstall it (pip uninstall detectron2), then rerun $0." >&2
      exit 1
    fi
    echo "detectron2: densecl's build is broken; reinstalling" ;;
esac

echo "detectron2: fetching pb1-detectron2==0.6 (sha256-pinned)"
ARCHIVE=$("$PY" "$COMPAT/fetch_sdist.py" "$WORK")
tar -xzf "$ARCHIVE" -C "$WORK"
SRC="$WORK/pb1-detectron2-0.6"
"$PY" "$COMPAT/patch_sdist.py" "$SRC"
if "$PY" -m pip show -q pb1-detectron2 >/dev/null 2>&1; then
  "$PY" -m pip uninstall -q -y pb1-detectron2
fi
# setup.py imports torch, so the build must see the environment's torch: no build isolation.
"$PY" -m pip install -q --no-build-isolation "$SRC"

state=$("$PY" "$COMPAT/check_install.py")
if [ "$state" != current ]; then
  echo "detectron2: installed, but the check says '$state'" >&2
  exit 1
fi
echo "detectron2: installed densecl's patched build of detectron2 v0.6 (no compiled _C; see docs/detectron2.md)"

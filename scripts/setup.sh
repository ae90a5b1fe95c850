#!/usr/bin/env bash
# One set-up step for users and CI: a virtual environment in .venv with the project, its dev tools and
# detectron2 (built from the registry's sdist by scripts/install_detectron2.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
if [ -f scripts/install_detectron2.sh ]; then
  bash scripts/install_detectron2.sh
fi
echo "setup done: activate with '. .venv/bin/activate'"

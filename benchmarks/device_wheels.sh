#!/usr/bin/env bash
# The wheels that benchmarks/gpu_checks.sh needs on the lent GPU machine (Python 3.12, x86_64, no network), and
# their use there (docs/gpu.md):
#   bash benchmarks/device_wheels.sh [build]        # here: fill .whl/ from benchmarks/device_wheels.txt (idempotent)
#   bash benchmarks/device_wheels.sh check [SITE]   # install .whl/*.whl into SITE (default /tmp/site), check
#                                                   # their requirements and imports; there, or here with a 3.12
#   bash benchmarks/device_wheels.sh gpu OUT        # there: check, then gpu_checks.sh (GPU_CHECKS_STEPS), results
#                                                   # packed into OUT in at most 6 files (the run tool takes 8)
# build: binary wheels by `pip download --no-deps` for cp312 manylinux x86_64; the [build] entries (sdist only)
# by `pip wheel --no-deps`; pb1-detectron2 from the sha256-pinned sdist patched by scripts/detectron2_compat/ as
# scripts/install_detectron2.sh patches it, then `pip wheel --no-build-isolation` (setup.py imports torch: run
# with .venv's python, DEVICE_WHEELS_PYTHON to pick another). Wheels of .whl/ not in the list are removed (two
# versions of one package stop the install there). Fails if the bundle exceeds DEVICE_WHEELS_MAX_MIB (60).
# gpu: DEVICE_SECONDS (default 570) caps the whole command, gpu_checks.sh cut short if need be, so that the
# packing still runs inside a 600-s `run`; DEVICE_WHEELS_CHECK=0 skips the install and check (a machine that
# has the packages, e.g. here with .venv active and GPU_CHECKS_TINY=1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
list=benchmarks/device_wheels.txt
whl=.whl
mode=${1:-build}

norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }  # PEP 503 name

# name==version lines of the list whose comment holds TAG ("" for the plain ones)
entries() {
  local tag=$1
  sed -E 's/^[[:space:]]+//' "$list" | grep -v '^#' | grep '==' | while read -r spec rest; do
    case "$tag:$rest" in
      ":"*"[build]"* | ":"*"[detectron2]"*) ;;
      ":"*) echo "$spec" ;;
      *) case "$rest" in *"[$tag]"*) echo "$spec" ;; esac ;;
    esac
  done
}

key() { echo "$(norm "${1%%==*}")==${1##*==}"; }  # name==version as a lookup key

# have[KEY]: the wheel of .whl/ for each name==version there
index_wheels() {
  local f base
  declare -gA have=()
  for f in "$whl"/*.whl; do
    [ -e "$f" ] || continue
    base=$(basename "$f")
    have[$(key "${base%%-*}==$(echo "$base" | cut -d- -f2)")]=$f
  done
}

missing() {  # the specs without a wheel
  local spec
  index_wheels
  for spec in "$@"; do [ -n "${have[$(key "$spec")]:-}" ] || echo "$spec"; done
}

build() {
  local py=${DEVICE_WHEELS_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
  fi
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" "$whl"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

  local plain built d2 todo
  mapfile -t plain < <(entries "")
  mapfile -t built < <(entries build)
  mapfile -t d2 < <(entries detectron2)

  mapfile -t todo < <(missing "${plain[@]}")
  if [ ${#todo[@]} -gt 0 ]; then
    echo "device wheels: downloading ${#todo[@]}: ${todo[*]}"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$whl" "${todo[@]}"
  fi

  mapfile -t todo < <(missing "${built[@]}")
  if [ ${#todo[@]} -gt 0 ]; then
    echo "device wheels: building from sdists: ${todo[*]}"
    "$py" -m pip wheel -q --no-deps -w "$whl" "${todo[@]}"
  fi

  # detectron2: rebuilt when the compat fixes change (the stamp: their hash)
  local stamp=$whl/.pb1-detectron2.stamp want stamped
  want=$(cat scripts/detectron2_compat/{fetch_sdist,patch_sdist,_C}.py | sha256sum | cut -c1-16)
  stamped=$(cat "$stamp" 2>/dev/null || true)
  if [ ${#d2[@]} -gt 0 ] && { [ -n "$(missing "${d2[0]}")" ] || [ "$want" != "$stamped" ]; }; then
    echo "device wheels: building ${d2[0]} from the patched sdist"
    local work
    work=$(mktemp -d)
    local archive
    archive=$("$py" scripts/detectron2_compat/fetch_sdist.py "$work")
    tar -xzf "$archive" -C "$work"
    "$py" scripts/detectron2_compat/patch_sdist.py "$work/pb1-detectron2-0.6"
    rm -f "$whl"/pb1_detectron2-*.whl "$whl"/pb1-detectron2-*.whl
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$whl" "$work/pb1-detectron2-0.6"
    rm -rf "$work"
    echo "$want" >"$stamp"
  fi

  # nothing that is not in the list; every entry there once, and only pure or cp312-compatible builds
  local f base spec
  declare -A wanted=()
  for spec in "${plain[@]}" "${built[@]}" "${d2[@]}"; do wanted[$(key "$spec")]=1; done
  index_wheels
  for spec in "${!have[@]}"; do
    f=${have[$spec]} base=$(basename "${have[$spec]}")
    if [ -z "${wanted[$spec]:-}" ]; then
      echo "device wheels: removing $base (not in $list)"
      rm -f "$f"
      continue
    fi
    case "$base" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-cp312-manylinux*_x86_64.whl | *-abi3-manylinux*_x86_64.whl) ;;
      *) echo "device wheels: $base does not install on cp312 x86_64" >&2; exit 1 ;;
    esac
  done
  for f in "$whl"/*.whl; do  # two files for one name==version (e.g. two platform builds)
    [ "${have[$(key "$(basename "$f" | cut -d- -f1)==$(basename "$f" | cut -d- -f2)")]}" = "$f" ] || {
      echo "device wheels: removing $(basename "$f") (a second wheel of one version)"; rm -f "$f"; }
  done
  mapfile -t todo < <(missing "${plain[@]}" "${built[@]}" "${d2[@]}")
  if [ ${#todo[@]} -gt 0 ]; then
    echo "device wheels: still missing: ${todo[*]}" >&2
    exit 1
  fi

  local bytes count max_mib=${DEVICE_WHEELS_MAX_MIB:-60}
  bytes=$(cat "$whl"/*.whl | wc -c)
  count=$(ls "$whl"/*.whl | wc -l)
  ls -S -l "$whl"/*.whl | awk '{ printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF }'
  awk -v b="$bytes" -v n="$count" -v m="$max_mib" 'BEGIN {
    printf "device wheels: %d wheels, %.1f MiB in .whl/ (limit %d MiB; a run carries 64 MiB with the tree)\n", n, b / 1048576, m
    exit (b > m * 1048576) }' || { echo "device wheels: the bundle exceeds $max_mib MiB" >&2; exit 1; }
}

# install .whl/ into SITE with the device's command, then check requirements and imports
check() {
  local site=${1:-/tmp/site} py=${DEVICE_WHEELS_PYTHON:-python3}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl
  PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH} "$py" - "$site" "$whl" <<'EOF'
import importlib, importlib.metadata as md, pathlib, subprocess, sys, traceback
from packaging.requirements import Requirement

site, whl = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
print("python", sys.version.split()[0], sys.executable)
# declared but never imported on the GPU checks' paths (benchmarks/device_wheels.txt)
UNUSED = {"pb1-detectron2": {"black", "future", "pydot"}}
norm = lambda n: n.lower().replace("_", "-").replace(".", "-")
warnings = 0
for wheel in sorted(whl.glob("*.whl")):
    name = wheel.name.split("-")[0]
    dist = md.distribution(name)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if norm(req.name) in UNUSED.get(norm(dist.metadata["Name"]), set()):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"MISSING  {dist.metadata['Name']} needs {req}: not installed")
            warnings += 1
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            print(f"VERSION  {dist.metadata['Name']} needs {req}, found {req.name} {version}")
            warnings += 1
print(f"requirements: {warnings} problem(s)")

failed = 0
modules = [
    "torch", "torchvision", "numpy", "pandas", "matplotlib", "PIL",
    "omegaconf", "hydra", "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "submitit",
    "kornia", "kornia_rs", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask", "fvcore.nn",
    "iopath.common.file_io", "yacs.config", "termcolor", "sqlalchemy", "alembic", "mlflow.tracking",
    "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store",
    "detectron2.modeling", "detectron2.engine", "detectron2.evaluation", "detectron2.data",
    "densecl", "densecl.data.gpu_augment", "densecl.transfer", "pipelines.run", "pipelines.report",
]
for name in modules:
    try:
        module = importlib.import_module(name)
        where = getattr(module, "__file__", None) or "?"
        print(f"ok       {name:58s} {'bundle' if where.startswith(str(site)) else where}")
    except Exception:
        failed += 1
        print(f"FAILED   {name}")
        traceback.print_exc(limit=3)
if not failed:
    # a SQLite store round trip through the client the pipeline uses
    import tempfile
    from mlflow.tracking import MlflowClient
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        exp = client.create_experiment("check", artifact_location=pathlib.Path(tmp, "art").as_uri())
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
        print("ok       mlflow sqlite store round trip")
    state = subprocess.run([sys.executable, "scripts/detectron2_compat/check_install.py"], capture_output=True,
                           text=True).stdout.strip()
    print(f"detectron2: {state}")
    failed += state != "current"
print(f"imports: {failed} failure(s)")
sys.exit(1 if failed else 0)
EOF
}

gpu() {  # the whole command inside DEVICE_SECONDS (default 570): install and check, gpu_checks.sh, packing
  local out=${1:?usage: device_wheels.sh gpu OUT} site=/tmp/site work=/tmp/gpu_checks rc=0 left
  local budget=${DEVICE_SECONDS:-570}
  mkdir -p "$out"
  if [ "${DEVICE_WHEELS_CHECK:-1}" != 0 ]; then  # 0: the packages are there already (e.g. .venv here)
    if ! check "$site" >"$out/device_check.txt" 2>&1; then
      cat "$out/device_check.txt"
      echo "device wheels: the check failed (device_check.txt); gpu_checks.sh not started" >&2
      exit 1
    fi
    grep -E '^(python|requirements|imports|detectron2|MISSING|VERSION)' "$out/device_check.txt"
    export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
  fi
  left=$(( budget - SECONDS - 15 ))  # 15 s for the packing
  echo "device wheels: gpu_checks.sh with ${left} s left (GPU_CHECKS_STEPS=${GPU_CHECKS_STEPS:-all})"
  timeout -k 10 "$left" bash benchmarks/gpu_checks.sh "$work" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "# cut after $left s by device_wheels.sh gpu (DEVICE_SECONDS=$budget): the steps after the last line did not finish" \
      | tee -a "$work/summary.txt"
  fi
  cp "$work/summary.txt" "$work/machine.txt" "$out/" 2>/dev/null || true
  for f in table.md table.csv; do
    if [ -f "$work/mini_paper_gpu_report/$f" ]; then cp "$work/mini_paper_gpu_report/$f" "$out/mini_paper_gpu_$f"; fi
  done
  # the logs, reports and small records in one file; no JPEGs, scenes, checkpoints or mlflow stores
  (cd "$work" && find . -path ./jpeg_folder -prune -o -type f -size -2M \
    \( -name '*.log' -o -name '*.txt' -o -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.yaml' \) \
    -print | tar -czf "$out/gpu_checks.tgz" -T -) || true
  ls -l "$out"
}

case "$mode" in
  build) build ;;
  check) check "${2:-/tmp/site}" ;;
  gpu) gpu "${2:-}" ;;
  *) echo "usage: $0 [build | check [SITE] | gpu OUT]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Install the project on machines without network (GPU nodes, a cluster's compute nodes) from a wheelhouse: a
# folder of wheels made on a machine that has network, then copied next to the repository (docs/gpu.md).
#
#   bash scripts/wheelhouse.sh build DIR [--python 3.12] [--arch x86_64] [--glibc 2.28] [--without torch,torchvision]
#       on the connected machine: every wheel the project needs on the target into DIR, and DIR/requirements.lock
#   bash scripts/wheelhouse.sh install DIR
#       on the node, in the environment that should hold the project (a venv, active): the locked wheels from DIR
#       without network, the project itself (editable, as scripts/setup.sh installs it), then `check`
#   bash scripts/wheelhouse.sh check
#       the active environment: `pip check`, the imports the pipeline needs, an mlflow SQLite store round trip,
#       detectron2's state (scripts/detectron2_compat/check_install.py) and whether torch sees a GPU
#
# build: the target is CPython --python (default: the building interpreter's version) on manylinux --arch
# (default: this machine's) with glibc >= --glibc (default 2.28: RHEL 8, Ubuntu 20.04 and later). The requirements
# of scripts/wheelhouse.txt are resolved for that target (binary wheels only) and downloaded; its [sdist] lines are
# built here as pure-Python wheels, and detectron2 from its patched sdist (its setup.py imports torch: the
# building interpreter needs torch, by default .venv's; WHEELHOUSE_BUILD_PYTHON picks another). --without
# leaves packages out, with what only they need, for nodes that provide them (e.g. a cluster's torch module).
# pip's own settings apply: PIP_INDEX_URL=https://download.pytorch.org/whl/cu126 (with
# PIP_EXTRA_INDEX_URL=https://pypi.org/simple) takes torch's wheels for another CUDA version from PyTorch's index.
# A rerun downloads only what is missing and removes the wheels the lock no longer lists.
# install and check use `python` on PATH (WHEELHOUSE_PYTHON picks another). Exit status 0 when all is well.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
root=$PWD
list=$root/scripts/wheelhouse.txt

usage() { sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }

# name==version lines of the list; with TAG, only those whose comment holds [TAG]
entries() {
  local tag=${1:-}
  sed -E 's/^[[:space:]]+//' "$list" | grep -v '^#' | grep '==' | while read -r spec rest; do
    if [ -z "$tag" ] || [[ $rest == *"[$tag]"* ]]; then echo "$spec"; fi
  done
}

build() {
  local dir=${1:-}
  [ -n "$dir" ] && [ "${dir#-}" = "$dir" ] || usage
  shift
  local pyver="" arch glibc=2.28 without=""
  arch=$(uname -m)
  while [ $# -gt 0 ]; do
    case "$1" in
      --python) pyver=$2; shift 2 ;;
      --arch) arch=$2; shift 2 ;;
      --glibc) glibc=$2; shift 2 ;;
      --without) without=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  local py=${WHEELHOUSE_BUILD_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
  fi
  [ -n "$pyver" ] || pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "wheelhouse: --python takes a version like 3.12, not '$pyver'" >&2; exit 2; }
  [[ $glibc =~ ^2\.[0-9]+$ ]] || { echo "wheelhouse: --glibc takes a version like 2.28, not '$glibc'" >&2; exit 2; }
  dir=$(absolute "$dir")
  mkdir -p "$dir"

  # the target's platform tags: manylinux_2_G down to manylinux_2_17 (= manylinux2014)
  local target=(--only-binary=:all: --implementation cp --python-version "$pyver") minor
  for ((minor = ${glibc#2.}; minor >= 17; minor--)); do target+=(--platform "manylinux_2_${minor}_${arch}"); done
  target+=(--platform "manylinux2014_${arch}")
  echo "wheelhouse: CPython $pyver, manylinux glibc >= $glibc, $arch${without:+, without $without} -> $dir"

  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN

  # the [sdist] entries: pure Python, built here once
  local spec name version
  for spec in $(entries sdist); do
    name=${spec%%==*} version=${spec##*==}
    if ! ls "$dir/$(echo "$name" | tr '-' '_')-$version-"*.whl >/dev/null 2>&1; then
      echo "wheelhouse: building $spec from its sdist"
      "$py" -m pip wheel -q --no-deps -w "$dir" "$spec"
    fi
  done

  # detectron2, rebuilt when the compat fixes change (the stamp: their hash)
  local d2 stamp=$dir/.pb1-detectron2.stamp want
  d2=$(entries detectron2)
  want=$(cat scripts/detectron2_compat/{fetch_sdist,patch_sdist,_C}.py | sha256sum | cut -c1-16)
  if [ -n "$d2" ] && { ! ls "$dir"/pb1_detectron2-*.whl >/dev/null 2>&1 || [ "$want" != "$(cat "$stamp" 2>/dev/null)" ]; }; then
    echo "wheelhouse: building $d2 from the patched sdist"
    local archive
    archive=$("$py" scripts/detectron2_compat/fetch_sdist.py "$tmp")
    tar -xzf "$archive" -C "$tmp"
    "$py" scripts/detectron2_compat/patch_sdist.py "$tmp/pb1-detectron2-0.6"
    rm -f "$dir"/pb1_detectron2-*.whl
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$tmp/pb1-detectron2-0.6"
    echo "$want" >"$stamp"
  fi

  # resolve the whole list for the target (metadata only), then keep what is reachable without --without
  grep -v '^[[:space:]]*#' "$list" | sed -E 's/[[:space:]]+#.*//' | grep . >"$tmp/requirements.txt"
  "$py" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" --target "$tmp/target" \
    "${target[@]}" --find-links "$dir" -r "$tmp/requirements.txt"
  "$py" - "$tmp/report.json" "$without" >"$tmp/requirements.lock" <<'EOF'
import json, re, sys
from packaging.requirements import Requirement

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
items = {norm(i["metadata"]["name"]): i for i in json.load(open(sys.argv[1]))["install"]}
without = {norm(n) for n in sys.argv[2].replace(",", " ").split()}
unknown = without - set(items)
if unknown:
    sys.exit(f"wheelhouse: --without {', '.join(sorted(unknown))}: not among the resolved packages")
# every requirement counts as an edge (markers and extras ignored): at worst a wheel too many, never one missing
todo = [name for name, item in items.items() if item.get("requested") and name not in without]
keep = set()
while todo:
    name = todo.pop()
    if name in keep:
        continue
    keep.add(name)
    for text in items[name]["metadata"].get("requires_dist") or []:
        dep = norm(Requirement(text).name)
        if dep in items and dep not in without:
            todo.append(dep)
print("# written by scripts/wheelhouse.sh build; install with: bash scripts/wheelhouse.sh install DIR")
for name in sorted(keep):
    print(f"{items[name]['metadata']['name']}=={items[name]['metadata']['version']}")
EOF

  # download what the lock lists (the local wheels are found in DIR); drop the rest; check every wheel's tags;
  # the lock goes into DIR last, when the wheels are all there
  grep -v '^#' "$tmp/requirements.lock" >"$tmp/lock.txt"
  "$py" -m pip download -q --no-deps "${target[@]}" --find-links "$dir" -d "$dir" -r "$tmp/lock.txt"
  "$py" - "$dir" "$tmp/requirements.lock" "$pyver" "$arch" "$glibc" <<'EOF'
import re, sys
from pathlib import Path
from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, lock, pyver, arch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
glibc = int(sys.argv[5].split(".")[1])
version = tuple(map(int, pyver.split(".")))
platforms = [f"manylinux_2_{m}_{arch}" for m in range(glibc, 16, -1)] + [f"manylinux2014_{arch}"]
supported = set(tags.cpython_tags(version, platforms=platforms)) | set(tags.compatible_tags(version, platforms=platforms))
locked = {}
for line in lock.read_text().splitlines():
    if line and not line.startswith("#"):
        name, _, ver = line.partition("==")
        locked[canonicalize_name(name)] = ver
found, total, problems = set(), 0, 0
for wheel in sorted(folder.glob("*.whl")):
    name, ver, _, wheel_tags = parse_wheel_filename(wheel.name)
    if locked.get(name) != str(ver):
        print(f"wheelhouse: removing {wheel.name} (not in the lock)")
        wheel.unlink()
    elif not wheel_tags & supported:  # from a build for another target
        print(f"wheelhouse: removing {wheel.name} (not for CPython {pyver} on {arch})")
        wheel.unlink()
    else:
        found.add(name)
        total += wheel.stat().st_size
for name in sorted(set(locked) - found):
    print(f"wheelhouse: no wheel for {name}=={locked[name]}", file=sys.stderr)
    problems += 1
print(f"wheelhouse: {len(found)} wheels, {total / 2**20:.1f} MiB in {folder}"
      + (f"; {problems} problem(s)" if problems else ""))
sys.exit(1 if problems else 0)
EOF
  cp "$tmp/requirements.lock" "$dir/requirements.lock"
}

install() {
  local dir=${1:-} py=${WHEELHOUSE_PYTHON:-python}
  [ -n "$dir" ] && dir=$(absolute "$dir")
  [ -n "$dir" ] && [ -f "$dir/requirements.lock" ] || { echo "wheelhouse: no $dir/requirements.lock (build it first)" >&2; usage; }
  "$py" -m pip install -q --no-index --find-links "$dir" -r "$dir/requirements.lock"
  # the project, editable (conf/ stays in the checkout); its build backend comes from the wheelhouse too
  "$py" -m pip install -q --no-index --find-links "$dir" --no-deps -e "$root"
  check
}

check() {
  local py=${WHEELHOUSE_PYTHON:-python} rc=0
  echo "python: $("$py" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  if "$py" -m pip check; then echo "requirements: consistent (pip check)"; else rc=1; fi
  "$py" - <<'EOF' || rc=1
import importlib, pathlib, subprocess, sys, tempfile, traceback

failed = 0
modules = [
    "torch", "torchvision", "numpy", "pandas", "matplotlib", "PIL", "kornia",
    "omegaconf", "hydra", "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "submitit",
    "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask", "fvcore.nn", "iopath.common.file_io",
    "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
    "detectron2.modeling", "detectron2.engine", "detectron2.evaluation", "detectron2.data",
    "densecl", "densecl.data.gpu_augment", "densecl.transfer", "pipelines.run", "pipelines.report",
]
for name in modules:
    try:
        importlib.import_module(name)
        print(f"ok       {name}")
    except Exception:
        failed += 1
        print(f"FAILED   {name}")
        traceback.print_exc(limit=3)
if not failed:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:  # the store the pipeline writes (tracking=sqlite)
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        run = client.create_run(client.create_experiment("check", pathlib.Path(tmp, "art").as_uri()))
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
        print("ok       mlflow SQLite store round trip")
    state = subprocess.run([sys.executable, "scripts/detectron2_compat/check_install.py"], capture_output=True,
                           text=True).stdout.strip()
    print(f"detectron2: {state}")
    failed += state not in ("current", "official")
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"cuda: torch {torch.__version__} sees {torch.cuda.device_count()} GPU(s), {p.name}")
    else:
        print(f"cuda: torch {torch.__version__} sees no GPU (a CPU build, or no GPU on this machine)")
print(f"imports: {failed} failure(s)")
sys.exit(1 if failed else 0)
EOF
  return "$rc"
}

mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
  build) build "$@" ;;
  install) install "${1:-}" ;;
  check) check ;;
  *) usage ;;
esac

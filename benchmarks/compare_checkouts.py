"""Does a refactor preserve behaviour? Run the pipeline with two checkouts of this project and compare what they
wrote: every stage's metrics of the default run, and the weights of a seeded pre-training, bit for bit.

A restructuring that claims to change no result (moving code between modules, renaming, splitting functions) is
checked against the code before it: the same command on the same synthetic data must give identical metrics and
identical tensors. Each checkout runs with its own code (a subprocess with PYTHONPATH=<checkout> in front, so
its `densecl` and `pipelines` win over the installed editable package; checked before each run) and the same
interpreter, in its own folder under --out:
  1. the default run, `python -m pipelines.run` (pretrain, convert, det_voc, seg_voc on synthetic data;
     about 8 minutes on a 2-core CPU), in <out>/<a|b>/default/;
  2. a seeded, deterministic pre-training with non-default options (S = 2 regions, split BN, LR and lambda
     warm-up, intermediate checkpoints; see PRETRAIN_OVERRIDES; 1-2 minutes), in <out>/<a|b>/pretrain/.
Compared, A against B (the table lists each item; the exit status is 1 on any difference):
  - each stage's metrics.json: the same keys, and values whose JSON text is identical; timing keys
    (images_per_sec, seconds, *_per_sec) are listed as "timing, not compared";
  - pretrain/backbone.pth ("state_dict") and the "model" tensors of pretrain/checkpoint.pt (not its "config",
    whose layout may change) of both runs, and convert/backbone.pkl ("model" arrays) of the default run: the
    same keys, dtypes and shapes, and the same bytes in every tensor.

Usage, with the code before the change in a git worktree:
    git worktree add /tmp/before <rev>
    python benchmarks/compare_checkouts.py /tmp/before . --out /tmp/compare [--skip-default]
    git worktree remove /tmp/before
--skip-default runs only the seeded pre-training. --out must not hold an earlier comparison (a finished stage
is never rerun, so old outputs would be compared instead of new ones); it is kept, with each run's logs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DEFAULT_STAGES = ("pretrain", "convert", "det_voc", "seg_voc")  # conf/config.yaml's stages
PRETRAIN_NAME = "compare_pretrain"
PRETRAIN_OVERRIDES = (
    f"name={PRETRAIN_NAME}",
    "seed=3",
    "stages=[pretrain]",
    "model.num_regions=2",  # S = 2 pooled regions instead of the native 3 x 3 grid of a 96 px crop
    "model.lambda_warmup_iters=10",
    "pretrain.bn_splits=2",  # batch 32 in two BN groups (queue_len 4096 stays a multiple of the batch)
    "pretrain.warmup_iters=5",
    "pretrain.iters=30",
    "pretrain.ckpt_every=10",  # two intermediate checkpoints before the final one
    "pretrain.log_every=5",
    "pretrain.deterministic=true",
    "tracking=disabled",
)
TIMING_KEYS = {"images_per_sec", "seconds"}
STDERR_TAIL = 3000

SAME, DIFFERENT, TIMING = "identical", "DIFFERENT", "timing, not compared"


class Row(NamedTuple):  # not a dataclass: the tests load this script without registering it as a module
    item: str
    status: str  # SAME, DIFFERENT or TIMING
    detail: str = ""


class RunFailed(RuntimeError):
    """A checkout's run exited non-zero, or did not run that checkout's code."""


# ------------------------------------------------------------------------------------------------ runs


def checkout_env(checkout: Path) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH and no inherited mlflow run."""
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH")) if p)
    return env


def check_imports(checkout: Path, env: dict[str, str], cwd: Path) -> None:
    """Raise RunFailed unless `densecl` and `pipelines` import from `checkout` under `env`."""
    code = "import densecl, pipelines; print(densecl.__file__); print(pipelines.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"cannot import densecl / pipelines from {checkout}:\n{done.stderr[-STDERR_TAIL:]}")
    for path in done.stdout.split():
        if not Path(path).resolve().is_relative_to(checkout):
            raise RunFailed(f"{path} imported instead of the checkout's code in {checkout}")


def run_pipeline(checkout: Path, workdir: Path, run: str, overrides: list[str]) -> float:
    """`python -m pipelines.run paths.output_dir=<workdir>/<run> *overrides` with the checkout's code, in
    `workdir`, its output in <workdir>/<run>.{stdout,stderr}.log; returns the wall time in seconds."""
    env = checkout_env(checkout)
    check_imports(checkout, env, workdir)
    cmd = [sys.executable, "-m", "pipelines.run", f"paths.output_dir={workdir / run}", *overrides]
    stdout, stderr = workdir / f"{run}.stdout.log", workdir / f"{run}.stderr.log"
    start = time.perf_counter()
    with stdout.open("w") as out, stderr.open("w") as err:
        returncode = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=err).returncode
    seconds = time.perf_counter() - start
    if returncode != 0:
        tail = stderr.read_text(errors="replace")[-STDERR_TAIL:]
        raise RunFailed(f"{' '.join(cmd)}\nexited {returncode} after {seconds:.0f} s; stderr ends:\n{tail}")
    return seconds


def run_checkout(checkout: Path, workdir: Path, skip_default: bool = False) -> dict[str, float]:
    """Both runs (or only the seeded pre-training) of one checkout in `workdir`; {run: wall seconds}."""
    workdir.mkdir(parents=True)
    seconds = {}
    if not skip_default:
        seconds["default"] = run_pipeline(checkout, workdir, "default", [])
        print(f"  default run: {seconds['default']:.1f} s", flush=True)
    seconds["pretrain"] = run_pipeline(checkout, workdir, "pretrain", list(PRETRAIN_OVERRIDES))
    print(f"  seeded pre-training: {seconds['pretrain']:.1f} s", flush=True)
    return seconds


# ---------------------------------------------------------------------------------------------- compare


def is_timing_key(key: str) -> bool:
    return key in TIMING_KEYS or key.endswith("_per_sec")


def _json_text(value) -> str:
    return json.dumps(value, sort_keys=True)  # exact: floats print round-trip, NaN prints as NaN


def compare_metrics(path_a: Path, path_b: Path, item: str) -> list[Row]:
    """One row per key of two metrics.json files (a single row when either is missing)."""
    missing = [side for side, path in (("A", path_a), ("B", path_b)) if not path.is_file()]
    if missing:
        return [Row(item, DIFFERENT, f"no metrics.json in {' and '.join(missing)}")]
    a, b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    rows = []
    for key in sorted(set(a) | set(b)):
        name = f"{item} {key}"
        if key not in b or key not in a:
            rows.append(Row(name, DIFFERENT, f"missing in {'B' if key not in b else 'A'}"))
        elif is_timing_key(key):
            rows.append(Row(name, TIMING, f"A {_json_text(a[key])}, B {_json_text(b[key])}"))
        elif _json_text(a[key]) == _json_text(b[key]):
            rows.append(Row(name, SAME, _json_text(a[key])))
        else:
            rows.append(Row(name, DIFFERENT, f"A {_json_text(a[key])}, B {_json_text(b[key])}"))
    return rows


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().reshape(-1).view(torch.uint8)


def _bytes_equal(a, b) -> bool:
    """Same dtype, shape and bytes (bitwise: NaN equals the same NaN, -0.0 differs from 0.0)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(_as_bytes(a), _as_bytes(b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    return type(a) is type(b) and a == b


def _describe_difference(a, b) -> str:
    if not (isinstance(a, torch.Tensor | np.ndarray) and isinstance(b, torch.Tensor | np.ndarray)):
        return f"{a!r} vs {b!r}"
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    unequal = int((_element_bytes(a) != _element_bytes(b)).any(axis=1).sum())
    a, b = torch.as_tensor(a).detach().cpu().double(), torch.as_tensor(b).detach().cpu().double()
    return f"{unequal}/{a.numel()} elements differ, max |A-B| {float((a - b).abs().nan_to_num().max()):.3g}"


def _element_bytes(x) -> np.ndarray:
    """The bytes of a tensor or array, one row per element."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.reshape(-1).view(torch.uint8).numpy().reshape(x.numel(), -1)
    x = np.ascontiguousarray(x)
    return x.reshape(-1).view(np.uint8).reshape(x.size, -1)


def compare_tensors(a: Mapping, b: Mapping, item: str) -> Row:
    """One row for two {name: tensor or array} dicts: the same keys and bitwise equal values."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    problems = [f"only in {side}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for side, keys in (("A", only_a), ("B", only_b)) if keys]
    differing = [key for key in sorted(set(a) & set(b)) if not _bytes_equal(a[key], b[key])]
    problems += [f"{key}: {_describe_difference(a[key], b[key])}" for key in differing[:5]]
    if len(differing) > 5:
        problems.append(f"... {len(differing) - 5} more tensors differ")
    if problems:
        return Row(item, DIFFERENT, "; ".join(problems))
    return Row(item, SAME, f"{len(a)} tensors, bitwise")


def load_torch_tensors(path: Path, key: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def load_pickled_arrays(path: Path) -> dict:
    with path.open("rb") as f:  # our own run's output
        return pickle.load(f, encoding="latin1")["model"]


WEIGHT_FILES = (  # (file under the job folder, loader) of the tensors compared
    ("pretrain/backbone.pth", lambda path: load_torch_tensors(path, "state_dict")),
    ("pretrain/checkpoint.pt", lambda path: load_torch_tensors(path, "model")),
    ("convert/backbone.pkl", load_pickled_arrays),
)


def compare_weight_files(job_a: Path, job_b: Path, run: str, files: tuple[str, ...]) -> list[Row]:
    rows = []
    for name, load in WEIGHT_FILES:
        if name not in files:
            continue
        item = f"{run} {name}"
        missing = [side for side, job in (("A", job_a), ("B", job_b)) if not (job / name).is_file()]
        if missing:
            rows.append(Row(item, DIFFERENT, f"missing in {' and '.join(missing)}"))
        else:
            rows.append(compare_tensors(load(job_a / name), load(job_b / name), item))
    return rows


def default_job(workdir: Path) -> Path:
    return workdir / "default" / "runs" / "default" / "base"


def pretrain_job(workdir: Path) -> Path | None:
    """The seeded pre-training's job folder (found, not predicted: its name follows the overrides)."""
    found = sorted((workdir / "pretrain" / "runs" / PRETRAIN_NAME).glob("*/pretrain/backbone.pth"))
    return found[0].parent.parent if len(found) == 1 else None


def compare_runs(workdir_a: Path, workdir_b: Path, skip_default: bool = False) -> list[Row]:
    """Every comparison of two checkouts' outputs (folders laid out by run_checkout)."""
    rows = []
    if not skip_default:
        job_a, job_b = default_job(workdir_a), default_job(workdir_b)
        stages = sorted(
            {p.parent.name for job in (job_a, job_b) for p in job.glob("*/metrics.json")} | set(DEFAULT_STAGES),
            key=lambda s: (DEFAULT_STAGES + (s,)).index(s),
        )
        for stage in stages:
            rows += compare_metrics(job_a / stage / "metrics.json", job_b / stage / "metrics.json", f"default {stage}")
        rows += compare_weight_files(job_a, job_b, "default", tuple(name for name, _ in WEIGHT_FILES))
    job_a, job_b = pretrain_job(workdir_a), pretrain_job(workdir_b)
    if job_a is None or job_b is None:
        sides = " and ".join(side for side, job in (("A", job_a), ("B", job_b)) if job is None)
        return rows + [Row("seeded pretrain", DIFFERENT, f"no single */pretrain/backbone.pth in {sides}")]
    rows += compare_metrics(job_a / "pretrain" / "metrics.json", job_b / "pretrain" / "metrics.json", "seeded pretrain")
    rows += compare_weight_files(job_a, job_b, "seeded", ("pretrain/backbone.pth", "pretrain/checkpoint.pt"))
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(row.item) for row in rows)
    status_width = max(len(row.status) for row in rows)
    for row in rows:
        print(f"{row.item:<{width}}  {row.status:<{status_width}}  {row.detail}".rstrip())


# ------------------------------------------------------------------------------------------------- main


def describe_checkout(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return f"{checkout} ({done.stdout.strip() if done.returncode == 0 else 'not a git checkout'})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout_a", type=Path, help="a densecl source tree (pipelines/, densecl/, conf/): before")
    parser.add_argument("checkout_b", type=Path, help="another one: after")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for both checkouts' runs (kept)")
    parser.add_argument("--skip-default", action="store_true", help="run only the seeded pre-training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkouts = {"a": args.checkout_a.resolve(), "b": args.checkout_b.resolve()}
    out = args.out.resolve()
    for label, checkout in checkouts.items():
        if not all((checkout / sub).is_dir() for sub in ("pipelines", "densecl", "conf")):
            print(f"{label.upper()}: {checkout} is not a densecl source tree (pipelines/, densecl/, conf/)")
            return 2
        if (out / label).exists():
            print(f"{out / label} exists: give a new --out (a finished stage is never rerun) or remove it")
            return 2
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    seconds = {}
    for label, checkout in checkouts.items():
        print(f"{label.upper()}: {describe_checkout(checkout)} -> {out / label}", flush=True)
        try:
            seconds[label] = run_checkout(checkout, out / label, args.skip_default)
        except RunFailed as err:
            print(f"{label.upper()} failed: {err}")
            return 1
    rows = compare_runs(out / "a", out / "b", args.skip_default)
    print()
    print_table(rows)
    print()
    for run in seconds["a"]:
        print(f"wall time, {run}: A {seconds['a'][run]:.1f} s, B {seconds['b'][run]:.1f} s")
    different = [row for row in rows if row.status == DIFFERENT]
    if different:
        print(f"{len(different)} of {len(rows)} items differ between A and B")
        return 1
    timing = sum(row.status == TIMING for row in rows)
    print(f"A and B identical: {len(rows) - timing} items compared ({timing} timing keys not compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m pipelines.report +experiment=NAME [overrides]` or `--parent RUN_ID`: the paper-style table of
a sweep, from its mlflow runs.

One row per swept value (e.g. each matching strategy), mean ± std over seeds, columns the final metrics
(det_voc/AP, det_voc/AP50, det_voc/AP75, seg_voc/mIoU, ..., pretrain/corr_acc). Written as Markdown and CSV
plus one plot per metric against the swept value into `<sweep folder>/report/` (or `--out`), printed, and
logged as artifacts (`report/`) of the sweep's parent run.

Which runs: the parent run whose id the sweep folder keeps (`mlflow_parent.json`; the same overrides as for
the sweep find it: `+experiment=NAME`, `paths.output_dir=...`), or `--parent RUN_ID`. Rows: the keys the
sweep varied (recorded on the parent run; else `hydra.sweeper.params` of the experiment) except
`report.seed_keys`; if the children also differ in another override (a sweep rerun with other fixed
overrides into the same folder), that key becomes a row key too, with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from densecl.files import write_atomic
from pipelines import credentials, schema
from pipelines.registry import STAGES
from pipelines.tracking import (
    DATASET_TAG,
    OVERRIDE_TAG,
    PARENT_FILE,
    PARENT_TAG,
    PROTOCOL_TAG,
    TAG_GROUP_DIR,
    TAG_SWEPT,
    TAG_SWEPT_VALUES,
    Tracker,
    read_run_id,
)

log = logging.getLogger("pipelines.report")

SKIPPED_SUFFIXES = ("/seconds", "_trivial")  # timings and the floors beside the headline figures
TABLE_ARTIFACT = "report/table.json"  # the parent run's table, as mlflow's UI renders tables
UI_DOT = "\u2024"  # ONE DOT LEADER: a dot to the eye, not to the UI's table (Table.for_the_ui)
METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "fwIoU", "mAcc", "pAcc")
PRETRAIN_METRICS = (
    "pretrain/loss",
    "pretrain/loss_dense",
    "pretrain/corr_acc",
    "pretrain/corr_acc_eval",
    "pretrain/figure_match_precision",
)


@dataclass
class Table:
    """The aggregated sweep: `summary` has one row per group (row keys, n, <metric> mean, <metric> std)."""

    row_keys: list[str]
    metrics: list[str]
    summary: pd.DataFrame
    runs: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # text columns after n (each stage's protocol)

    def display(self, digits: int = 2) -> pd.DataFrame:
        """One row per group: the row keys, n, the labels, and each metric as 'mean ± std' text: the table
        as shown."""
        frame = self.summary[self.row_keys].astype(str)
        frame["n"] = self.summary["n"].astype(int).astype(str)
        for label in self.labels:
            frame[label] = self.summary[label].astype(str)
        for m in self.metrics:
            means, stds = self.summary[f"{m} mean"], self.summary[f"{m} std"]
            frame[m] = [format_mean_std(mean, std, digits) for mean, std in zip(means, stds)]
        return frame

    def for_the_ui(self, digits: int = 2) -> pd.DataFrame:
        """`display()` for mlflow's table viewer, which reads a column name with a dot as a nested field and shows
        its cells empty (`model.loss_lambda`): each dot becomes a one-dot leader, which looks the same."""
        frame = self.display(digits)
        return frame.rename(columns={c: c.replace(".", UI_DOT) for c in frame.columns})

    def markdown(self, digits: int = 2) -> str:
        frame = self.display(digits)
        lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False)]
        text = "\n".join(lines) + "\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {note}" for note in self.notes) + "\n"
        return text


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def default_metrics(columns: list[str]) -> list[str]:
    """Final stage metrics present in the runs, in paper order: downstream stages, then pre-training."""
    present = {c[len("metrics.") :] for c in columns if c.startswith("metrics.")}
    chosen = []
    for stage in (s.name for s in STAGES.with_settings()):  # not the per-class values (AP-<class>) nor timings
        names = sorted(
            (m for m in present if m.startswith(f"{stage}/") and "-" not in m and not m.endswith(SKIPPED_SUFFIXES)),
            key=lambda m: _metric_rank(m.split("/")[-1]),
        )
        chosen += names
    return chosen + [m for m in PRETRAIN_METRICS if m in present]


def _metric_rank(name: str) -> tuple[int, str]:
    return (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), name)


def _sort_value(value: str, order: list[str]) -> tuple:
    if value in order:
        return (0, order.index(value), "")
    try:
        return (1, float(value), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(value))


def build_table(
    runs: pd.DataFrame,
    swept_keys: list[str],
    seed_keys: list[str],
    metrics: list[str] | None = None,
    extra_columns: list[str] | None = None,
    value_order: dict[str, list[str]] | None = None,
) -> Table:
    """Group `runs` (an mlflow.search_runs frame) by the swept keys except the seed keys; mean ± std."""
    notes: list[str] = []
    runs = runs.copy()
    value_order = value_order or {}

    def key_column(key: str) -> str | None:
        for column in (f"tags.{OVERRIDE_TAG}{key}", f"params.{key}"):
            if column in runs.columns:
                return column
        return None

    row_keys = [k for k in swept_keys if k not in seed_keys]
    override_columns = [c for c in runs.columns if c.startswith(f"tags.{OVERRIDE_TAG}")]
    for column in override_columns:
        key = column[len(f"tags.{OVERRIDE_TAG}") :]
        if key in swept_keys or key in seed_keys:
            continue
        if runs[column].fillna("<unset>").nunique() > 1:
            row_keys.append(key)
            notes.append(f"runs also differ in `{key}` (not swept): it is a row key too")
    for column in extra_columns or []:
        if column not in row_keys:
            row_keys.append(column)

    group_columns = []
    for key in row_keys:
        column = key_column(key)
        if column is None:
            runs[key] = "–"
            notes.append(f"no run records `{key}`")
        else:
            runs[key] = runs[column].fillna("<default>").astype(str)
        group_columns.append(key)

    for column in sorted(c for c in runs.columns if c.startswith(f"tags.{DATASET_TAG}")):
        for title in runs[column].dropna().unique():
            notes.append(f"{column[len(f'tags.{DATASET_TAG}'):]} ran on {title}")

    metrics = metrics or default_metrics(list(runs.columns))
    metric_columns = []
    for metric in metrics:
        column = f"metrics.{metric}"
        if column not in runs.columns:
            runs[column] = float("nan")
            notes.append(f"no run has the metric `{metric}`")
        metric_columns.append(column)

    if not group_columns:
        runs["all"] = "all runs"
        group_columns = ["all"]
        row_keys = ["all"]
    grouped = runs.groupby(group_columns, dropna=False, sort=False)
    summary = grouped.size().rename("n").reset_index()
    labels = []
    for column in sorted(c for c in runs.columns if c.startswith(f"tags.{PROTOCOL_TAG}")):
        label = f"{column[len(f'tags.{PROTOCOL_TAG}'):]} protocol"
        values = grouped[column].agg(lambda v: "/".join(sorted(set(v.dropna().astype(str)))) or "–")
        summary[label] = values.to_numpy()
        labels.append(label)
    for metric, column in zip(metrics, metric_columns):
        stats = grouped[column].agg(["mean", "std"]).reset_index(drop=True)
        summary[f"{metric} mean"] = stats["mean"].to_numpy()
        summary[f"{metric} std"] = stats["std"].to_numpy()
    summary = summary.sort_values(
        by=row_keys,
        key=lambda col: col.map(lambda v: _sort_value(v, [str(x) for x in value_order.get(col.name, [])])),
        kind="stable",
    ).reset_index(drop=True)
    return Table(row_keys, metrics, summary, runs, notes, labels)


# ------------------------------------------------------------------------------------------ plots


def plot_metric(table: Table, metric: str):
    """Mean ± std of `metric` against the row values, with every run as a dot."""
    from matplotlib.figure import Figure

    labels = [", ".join(str(row[k]) for k in table.row_keys) for _, row in table.summary.iterrows()]
    x = list(range(len(labels)))
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    means = table.summary[f"{metric} mean"].to_numpy(dtype=float)
    stds = table.summary[f"{metric} std"].fillna(0.0).to_numpy(dtype=float)
    ax.errorbar(x, means, yerr=stds, fmt="o-", capsize=4, color="tab:blue", label="mean ± std")
    column = f"metrics.{metric}"
    for i, (_, row) in enumerate(table.summary.iterrows()):
        mask = pd.Series(True, index=table.runs.index)
        for key in table.row_keys:
            mask &= table.runs[key] == row[key]
        values = table.runs.loc[mask, column].dropna().to_numpy(dtype=float)
        ax.plot([i] * len(values), values, ".", color="0.4", alpha=0.7)
    ax.set_xticks(x, labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0, ha="right")
    ax.set_xlabel(", ".join(table.row_keys))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return fig


# training curves drawn per row, each with the reference curve the model logs beside it (chance level)
CURVE_METRICS = {
    "pretrain/corr_acc": "pretrain/corr_acc_chance",
    "pretrain/corr_acc_eval": "pretrain/corr_acc_eval_chance",  # fixed pairs at pretrain.corr_eval_crop
}


def metric_histories(tracker: Tracker, table: Table, metric: str) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per row label, the (steps, values) history of `metric` of each run in the row (runs without it left out)."""
    curves: dict[str, list[tuple[list[int], list[float]]]] = {}
    for _, run in table.runs.iterrows():
        history = sorted(tracker.call(tracker.client.get_metric_history, run["run_id"], metric),
                         key=lambda point: point.step)
        if len(history) < 2:
            continue
        label = ", ".join(str(run[k]) for k in table.row_keys) or "all"
        curves.setdefault(label, []).append(([p.step for p in history], [p.value for p in history]))
    return curves


def mean_curve(runs: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over runs at the steps they all logged."""
    shared = sorted(set.intersection(*(set(steps) for steps, _ in runs))) if runs else []
    by_step = [dict(zip(steps, values)) for steps, values in runs]
    return shared, [sum(run[s] for run in by_step) / len(by_step) for s in shared]


def plot_curves(curves: dict, metric: str, reference: dict | None = None, reference_name: str = "chance"):
    """Each run's curve (thin) and, per row, the mean over its runs (thick); the row's mean reference
    curve (e.g. chance level on the same crops) dashed in the same colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        for steps, values in runs:
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        steps, mean = mean_curve(runs)
        if steps:
            ax.plot(steps, mean, color=colour, linewidth=2.0, label=f"{label} (n={len(runs)})")
        ref_steps, ref_mean = mean_curve((reference or {}).get(label, []))
        if ref_steps:
            ax.plot(ref_steps, ref_mean, color=colour, linestyle="--", linewidth=1.0,
                    label=f"{label}: {reference_name}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def safe_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def write_report(table: Table, out_dir: Path, curves: dict | None = None) -> list[Path]:
    """table.md, table.csv (means, stds and n), plots/<metric>.png and, for each metric in `curves`
    ({metric: (histories per row, reference histories per row)}), plots/curve_<metric>.png; returns the written
    paths. Each file is written atomically (densecl.files): a failed rewrite keeps the previous report."""
    text = table.markdown().encode()
    written = [
        write_atomic(out_dir / "table.md", lambda f: f.write(text)),
        write_atomic(out_dir / "table.csv", lambda f: table.summary.to_csv(f, index=False)),
    ]
    for metric in table.metrics:
        if table.summary[f"{metric} mean"].notna().any():
            figure = plot_metric(table, metric)
            written.append(write_atomic(out_dir / "plots" / f"{safe_name(metric)}.png", figure.savefig))
    for metric, (histories, reference) in (curves or {}).items():
        if histories:
            figure = plot_curves(histories, metric, reference)
            written.append(write_atomic(out_dir / "plots" / f"curve_{safe_name(metric)}.png", figure.savefig))
    return written


# ---------------------------------------------------------------------------------- finding the runs


def find_parent(cfg, tracker: Tracker) -> str:
    """The parent run of the sweep (or run group) the composed config describes."""
    output_dir = Path(cfg.paths.output_dir)
    candidates = [
        output_dir / "multirun" / cfg.name / PARENT_FILE,
        output_dir / "runs" / cfg.name / PARENT_FILE,
    ]
    for path in candidates:
        run_id = read_run_id(path)
        if run_id and tracker.run_exists(run_id):
            return run_id
    experiment = tracker.call(tracker.client.get_experiment_by_name, cfg.tracking.experiment_name)
    if experiment is not None:
        parents = tracker.call(
            tracker.client.search_runs,
            [experiment.experiment_id],
            filter_string="tags.`densecl.kind` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if parents:
            return parents[0].info.run_id
    raise SystemExit(
        f"no sweep found for name={cfg.name!r}: looked for {', '.join(map(str, candidates))} and for "
        f"sweep runs in mlflow experiment {cfg.tracking.experiment_name!r} at {tracker.uri}. Run the sweep "
        f"first, or pass --parent RUN_ID (and the tracking.uri / paths.output_dir it used)."
    )


def search_children(tracker: Tracker, parent_id: str) -> pd.DataFrame:
    """The parent's child runs as mlflow.search_runs lays them out (run_id, status, metrics.*, params.*,
    tags.*), read through this tracker's client: mlflow.search_runs would need the process-wide tracking URI,
    which mlflow also exports to the environment of every process started afterwards."""
    parent = tracker.call(tracker.client.get_run, parent_id)
    rows, token = [], None
    while True:
        page = tracker.call(
            tracker.client.search_runs, [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=1000, page_token=token,
        )  # fmt: skip
        for run in page:
            rows.append({
                "run_id": run.info.run_id, "status": run.info.status,
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"tags.{k}": v for k, v in run.data.tags.items()},
            })  # fmt: skip
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def report(
    overrides: list[str],
    parent_id: str | None = None,
    out_dir: Path | None = None,
    log_artifacts: bool = True,
    tracking_uri: str | None = None,
) -> tuple[Table, list[Path]]:
    """The report of the sweep the overrides describe (or of `parent_id`), made again from its mlflow runs."""
    cfg = schema.compose(overrides)
    uri = tracking_uri or cfg.tracking.uri
    if not uri:
        raise SystemExit("no tracking URI: tracking is disabled in this config; pass --tracking-uri")
    tracker = Tracker(uri, retries=cfg.tracking.retries, retry_wait_s=cfg.tracking.retry_wait_s)
    return report_sweep(cfg, tracker, parent_id or find_parent(cfg, tracker), out_dir, log_artifacts)


def report_sweep(cfg, tracker: Tracker, parent_id: str, out_dir: Path | None = None,
                 log_artifacts: bool = True) -> tuple[Table, list[Path]]:
    """Build the table of `parent_id`'s child runs, write it with its plots into `out_dir` (default: the
    sweep folder's report/) and log it all to the parent run: the table also as an mlflow table artifact
    (`report/table.json`, rendered by the UI) and the plots as images. The sweep's end (pipelines.callbacks)
    and `python -m pipelines.report` both call it."""
    parent = tracker.call(tracker.client.get_run, parent_id)
    runs = search_children(tracker, parent_id)
    if runs.empty:
        raise SystemExit(f"parent run {parent_id} has no child runs yet")

    tags = parent.data.tags
    if TAG_SWEPT in tags:
        swept = json.loads(tags[TAG_SWEPT])
    else:
        swept = [str(k).lstrip("+") for k in (cfg.hydra.sweeper.get("params") or {})]
    value_order = json.loads(tags.get(TAG_SWEPT_VALUES, "{}"))
    table = build_table(
        runs,
        swept_keys=swept,
        seed_keys=list(cfg.report.seed_keys),
        metrics=list(cfg.report.metrics) or None,
        extra_columns=list(cfg.report.extra_columns),
        value_order=value_order,
    )
    unfinished = runs[runs["status"] != "FINISHED"]
    if len(unfinished):
        table.notes.append(
            f"{len(unfinished)} of {len(runs)} runs are not FINISHED ({', '.join(unfinished['status'])})"
        )
    if out_dir is None:
        group = tags.get(TAG_GROUP_DIR)
        out_dir = Path(group) / "report" if group else Path(cfg.paths.output_dir) / "reports" / parent_id
    curves = {
        metric: (metric_histories(tracker, table, metric), metric_histories(tracker, table, reference))
        for metric, reference in CURVE_METRICS.items()
    }
    written = write_report(table, out_dir, curves)
    if log_artifacts:
        for path in written:
            tracker.log_artifact(parent_id, path, "report" if path.parent == out_dir else "report/plots")
        tracker.call(tracker.client.log_table, parent_id, table.for_the_ui(), TABLE_ARTIFACT)
        for path in written:
            if path.suffix == ".png":
                tracker.log_image(parent_id, path, key=f"report/{path.stem}")
    return table, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.report",
        description="Paper-style tables (mean ± std over seeds) of a sweep's mlflow runs.",
        epilog="Example: python -m pipelines.report +experiment=ablation_matching",
    )
    parser.add_argument("overrides", nargs="*", help="the Hydra overrides the sweep was launched with")
    parser.add_argument("--parent", help="the sweep's parent run id (default: from the sweep folder)")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep folder>/report)")
    parser.add_argument("--tracking-uri", help="mlflow store (default: tracking.uri of the config)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = credentials.to_environment(args.overrides)  # a password in a URI: into the environment
    uri = credentials.uri_to_environment(args.tracking_uri) if args.tracking_uri else None
    table, written = report(overrides, args.parent, args.out, not args.no_log, uri)
    sys.stdout.write(table.markdown())
    log.info("written: %s", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()

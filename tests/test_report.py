"""pipelines.report: rows per swept value, mean ± std over seeds, from the runs of a sweep's parent run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines import report
from pipelines.tracking import PARENT_FILE, TAG_GROUP_DIR, TAG_KIND, TAG_SWEPT, TAG_SWEPT_VALUES, Tracker

MATCHINGS = ["backbone", "projection", "random", "geometric"]
SEEDS = [0, 1, 2]


def fake_runs(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for matching in MATCHINGS[::-1]:  # not in sweep order: the table must restore it
        for seed in SEEDS:
            rows.append({
                "tags.override.matching": matching,
                "tags.override.seed": str(seed),
                "params.seed": str(seed),
                "metrics.det_voc/AP": rng.normal(50, 2),
                "metrics.det_voc/AP50": rng.normal(80, 1),
                "metrics.pretrain/loss": rng.normal(6, 0.1),
                "metrics.det_voc/seconds": 10.0,
                "status": "FINISHED",
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_table_groups_by_swept_values_and_averages_seeds():
    runs = fake_runs(np.random.default_rng(0))
    table = report.build_table(runs, ["matching", "seed"], ["seed"], value_order={"matching": MATCHINGS})
    assert table.row_keys == ["matching"]
    assert table.metrics == ["det_voc/AP", "det_voc/AP50", "pretrain/loss"]  # no per-stage timings
    assert list(table.summary["matching"]) == MATCHINGS
    for _, row in table.summary.iterrows():
        values = runs.loc[runs["tags.override.matching"] == row["matching"], "metrics.det_voc/AP"]
        assert row["n"] == len(SEEDS)
        assert row["det_voc/AP mean"] == pytest.approx(values.mean())
        assert row["det_voc/AP std"] == pytest.approx(values.std(ddof=1))
    markdown = table.markdown()
    first = table.summary.iloc[0]
    assert f"| backbone | 3 | {first['det_voc/AP mean']:.2f} ± {first['det_voc/AP std']:.2f} |" in markdown
    assert markdown.splitlines()[0] == "| matching | n | det_voc/AP | det_voc/AP50 | pretrain/loss |"


def test_the_table_for_the_ui_has_no_dotted_column_a_viewer_would_leave_empty():
    """mlflow's table viewer reads `model.loss_lambda` as a nested field and shows its cells empty."""
    runs = fake_runs(np.random.default_rng(1))
    runs = runs.rename(columns={"tags.override.matching": "tags.override.model.num_regions"})
    swept = ["model.num_regions", "seed"]
    table = report.build_table(runs, swept, ["seed"], value_order={"model.num_regions": MATCHINGS})
    shown = table.for_the_ui()
    assert not any("." in c for c in shown.columns)
    assert list(shown.columns[:2]) == ["model\u2024num_regions", "n"]
    assert shown.iloc[:, 0].tolist() == table.display().iloc[:, 0].tolist() == list(MATCHINGS)


def test_the_table_names_the_labelled_sets_the_stages_ran_on():
    runs = fake_runs(np.random.default_rng(2))
    runs["tags.densecl.dataset.det_voc"] = "shelves: 8 train / 4 val images, 2 classes (gadget, widget)"
    runs.loc[0, "tags.densecl.dataset.det_voc"] = None  # a run without it adds nothing
    table = report.build_table(runs, ["matching", "seed"], ["seed"])
    assert "- det_voc ran on shelves: 8 train / 4 val images, 2 classes (gadget, widget)\n" in table.markdown()
    assert sum("ran on" in note for note in table.notes) == 1


def test_an_unswept_override_that_varies_becomes_a_row_key():
    runs = fake_runs(np.random.default_rng(1))
    runs["tags.override.pretrain.iters"] = np.where(runs["params.seed"] == "2", "200", "100")
    table = report.build_table(runs, ["matching", "seed"], ["seed"])
    assert table.row_keys == ["matching", "pretrain.iters"]
    assert len(table.summary) == 8 and any("pretrain.iters" in note for note in table.notes)


def test_single_seed_rows_show_the_mean_alone_and_missing_metrics_are_noted():
    runs = fake_runs(np.random.default_rng(2)).query("`tags.override.seed` == '0'")
    table = report.build_table(runs, ["matching"], ["seed"], metrics=["det_voc/AP", "seg_voc/mIoU"])
    lines = table.markdown().splitlines()
    assert "±" not in lines[2] and lines[2].endswith("| – |")
    assert any("seg_voc/mIoU" in note for note in table.notes)


def test_sweep_over_seeds_only_is_one_row():
    runs = fake_runs(np.random.default_rng(3)).query("`tags.override.matching` == 'random'")
    table = report.build_table(runs, ["seed"], ["seed"])
    assert table.row_keys == ["all"] and list(table.summary["n"]) == [len(SEEDS)]


@pytest.fixture
def sweep_store(tmp_path):
    """A fake ablation_matching sweep in an mlflow store under tmp_path, laid out as the pipeline does."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", retries=3, retry_wait_s=0.01)
    experiment = tracker.experiment_id("ablation_matching", str(tmp_path / "mlartifacts"))
    sweep_dir = tmp_path / "multirun" / "ablation_matching"
    tags = {
        TAG_KIND: "sweep",
        TAG_GROUP_DIR: str(sweep_dir),
        TAG_SWEPT: json.dumps(["matching", "seed"]),
        TAG_SWEPT_VALUES: json.dumps({"matching": MATCHINGS, "seed": [str(s) for s in SEEDS]}),
    }
    parent, _ = tracker.open_run(sweep_dir / PARENT_FILE, experiment, "ablation_matching", tags=tags)
    rng = np.random.default_rng(4)
    expected = {}
    for matching in MATCHINGS:
        values = rng.normal(55, 1, size=len(SEEDS))
        expected[matching] = values
        for seed, value in zip(SEEDS, values):
            run, _ = tracker.open_run(
                sweep_dir / f"matching={matching},seed={seed}" / "mlflow_run.json",
                experiment,
                f"matching={matching},seed={seed}",
                tags={"override.matching": matching, "override.seed": str(seed)},
                parent_run_id=parent,
            )
            tracker.log_metrics(run, {"det_voc/AP": value, "det_voc/AP50": value + 25})
            points = {"pretrain/corr_acc_chance": 0.2}
            tracker.log_metric_points(run, [(s, {**points, "pretrain/corr_acc": 0.2 + s / 100}) for s in (10, 20, 30)])
            tracker.finish(run)
    return tracker, parent, sweep_dir, expected


def test_report_reads_the_sweep_writes_files_and_logs_them(sweep_store, tmp_path, capsys):
    tracker, parent, sweep_dir, expected = sweep_store
    report.main(["+experiment=ablation_matching", f"paths.output_dir={tmp_path}"])
    printed = capsys.readouterr().out
    out = sweep_dir / "report"
    csv = pd.read_csv(out / "table.csv")
    assert list(csv["matching"]) == MATCHINGS
    for matching, values in expected.items():
        row = csv[csv["matching"] == matching].iloc[0]
        assert row["det_voc/AP mean"] == pytest.approx(values.mean())
        assert row["det_voc/AP std"] == pytest.approx(values.std(ddof=1))
        assert f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" in printed
    assert (out / "table.md").read_text() in printed
    assert (out / "plots" / "det_voc_AP.png").stat().st_size > 1000
    assert (out / "plots" / "curve_pretrain_corr_acc.png").stat().st_size > 1000
    logged = {a.path for a in tracker.client.list_artifacts(parent, "report")}
    assert {"report/table.md", "report/table.csv", "report/plots"} <= logged


def test_curves_are_grouped_by_row_and_averaged_at_shared_steps(sweep_store):
    tracker, parent, _, _ = sweep_store
    runs = report.search_children(tracker, parent)
    table = report.build_table(runs, swept_keys=["matching", "seed"], seed_keys=["seed"])
    curves = report.metric_histories(tracker, table, "pretrain/corr_acc")
    assert sorted(curves) == sorted(MATCHINGS)
    assert all(len(runs) == len(SEEDS) for runs in curves.values())
    assert report.mean_curve(curves["random"]) == ([10, 20, 30], pytest.approx([0.3, 0.4, 0.5]))
    assert report.mean_curve([([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3], [4.0, 6.0])]) == ([2, 3], [3.0, 4.5])
    assert report.metric_histories(tracker, table, "no/such_metric") == {}


def test_report_by_parent_id_into_another_folder(sweep_store, tmp_path):
    tracker, parent, _, _ = sweep_store
    table, written = report.report(
        [f"paths.output_dir={tmp_path}"],
        parent_id=parent,
        out_dir=tmp_path / "elsewhere",
        log_artifacts=False,
    )
    assert table.row_keys == ["matching"]
    assert all(p.is_relative_to(tmp_path / "elsewhere") for p in written)
    assert tracker.client.list_artifacts(parent) == []


def test_report_without_a_sweep_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="Run the sweep first"):
        report.report(["+experiment=ablation_regions", f"paths.output_dir={tmp_path}"])

"""The stage registry (pipelines.registry) is the one list of stages: a stand-in stage added as one record and
its runner gets a typed config section, is planned, run, printed and reported; and every registered stage is
in the docs."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from densecl.typed_settings import check, neutral, result
from pipelines import plan, schema
from pipelines.callbacks import runs_view
from pipelines.console import headline, summary_table
from pipelines.journal import Journal
from pipelines.registry import STAGES, Stage
from pipelines.report import report_sweep
from pipelines.stages import DONE, planned_stages, run_stages
from pipelines.tracking import CHILD_FILE, PARENT_TAG, TAG_SWEPT, RunLogger, Tracker

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ToySettings:
    factor: float = result(2.0)
    seed: int = result(0)
    device: str = neutral("auto")

    def validate(self) -> None:
        check(self.factor > 0, "factor", self.factor, "allowed: a value > 0")

    def summary(self) -> dict:
        return {"factor": self.factor, "iterations": 5}


def run_toy(job, stage: str) -> dict[str, float]:
    cfg = job.cfg.stage_config(stage)
    (job.stage_dir(stage) / "ran.txt").write_text(str(cfg.factor))
    return {"score": 10.0 * cfg.factor + cfg.seed, "score_trivial": 1.0}


TOY = Stage("toy", run_toy, ToySettings, headline=("score",), baseline="score_trivial")


def test_a_registered_stage_is_planned_run_printed_and_reported(tmp_path):
    with STAGES.added(TOY, before="probe"):
        assert STAGES.names().index("toy") == STAGES.names().index("probe") - 1
        cfg = schema.compose([f"paths.output_dir={tmp_path}", "stages=[toy,probe]", "downstream.toy.factor=3",
                              "seed=1", "tracking.uri=sqlite:///" + str(tmp_path / "mlflow.db")])
        settings = schema.settings(cfg)
        assert planned_stages(settings) == ["toy", "probe"]
        assert settings.stage_config("toy") == ToySettings(factor=3.0, seed=1, device="auto")
        assert schema.job_dirname(["downstream.toy.factor=3", "downstream.toy.device=cpu"]) == "downstream.toy.factor=3"

        job_dir = tmp_path / "job"
        toy_plan = plan.plan_job(cfg, job_dir)[0]
        assert (toy_plan.stage, toy_plan.status, toy_plan.iterations_to_run) == ("toy", "new", 5)
        assert toy_plan.settings == {"factor": 3.0, "iterations": 5}
        assert not job_dir.exists()  # planning made nothing

        tracker = Tracker(cfg.tracking.uri)
        experiment = tracker.experiment_id("toy", str(tmp_path / "artifacts"))
        parent, _ = tracker.open_run(tmp_path / "parent.json", experiment, "sweep", tags={TAG_SWEPT: "[]"})
        child, _ = tracker.open_run(job_dir / CHILD_FILE, experiment, "job", tags={PARENT_TAG: parent})
        toy_only = schema.compose([f"paths.output_dir={tmp_path}", "stages=[toy]", "downstream.toy.factor=3",
                                   "seed=1", "tracking.uri=sqlite:///" + str(tmp_path / "mlflow.db")])
        logger = RunLogger(Journal(job_dir / CHILD_FILE, lambda: tracker))
        results = run_stages(toy_only, job_dir, logger)
        assert logger.flush(10)
        assert results == {"toy": {"score": 31.0, "score_trivial": 1.0}}
        assert (job_dir / "toy" / "ran.txt").read_text() == "3.0"
        assert json.loads((job_dir / "toy" / DONE).read_text())["settings"]["downstream.toy.factor"] == "3.0"
        assert plan.plan_job(toy_only, job_dir)[0].status == "done"

        assert headline("toy", results["toy"]) == "score 31 (trivial: 1)"
        assert "| job | toy | score 31 (trivial: 1) |" in summary_table({"job": job_dir}, STAGES.names(), DONE)
        assert "metrics.`toy/score`" in runs_view(toy_only, [])[0]
        tracker.finish(child)
        table, _ = report_sweep(toy_only, tracker, parent, tmp_path / "report", log_artifacts=False)
        assert table.metrics == ["toy/score"]
        assert table.summary["toy/score mean"].tolist() == [31.0]
    downstream = typing.get_type_hints(schema.pipeline_schema())["downstream"]
    assert "toy" not in STAGES and "toy" not in {f.name for f in dataclasses.fields(downstream)}


def test_a_registered_stage_section_refuses_a_misspelt_key():
    with STAGES.added(TOY):
        with pytest.raises(schema.UnknownKeyError, match="did you mean downstream.toy.factor.*its keys: factor, seed"):
            schema.check_override_keys(["downstream.toy.fator=3"])
    with pytest.raises(schema.UnknownKeyError, match="downstream has no key 'toy'"):
        schema.check_override_keys(["downstream.toy.factor=3"])


def test_a_stage_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"), STAGES.added(Stage("probe", run_toy)):
        pass


def test_every_registered_stage_is_in_the_docs():
    """docs/pipeline.md's list of stages, and the stage module's docstring, name every stage of the registry."""
    import pipelines.stages

    pipeline_doc = (ROOT / "docs" / "pipeline.md").read_text()
    for stage in STAGES:
        assert f"`{stage.name}`" in pipeline_doc, stage.name
        assert stage.name in pipelines.stages.__doc__, stage.name

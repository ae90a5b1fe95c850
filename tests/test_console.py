"""What the terminal shows: headline figures beside their trivial baseline, the summary table, and
detectron2's detailed log kept to the stage's file unless verbose."""

import json
import logging
import warnings

from pipelines.console import detailed_logs_to_file_only, headline, summary_table


def test_headlines_show_the_figures_a_stage_is_judged_by_beside_the_trivial_baseline():
    assert headline("det_voc", {"AP": 5.414, "AP50": 19.12, "AP75": 3.0}) == "AP 5.414, AP50 19.12 (trivial: 0)"
    seg = {"mIoU": 23.12, "mIoU_trivial": 8.181, "pAcc": 80.0, "IoU-circle": 40.0}
    assert headline("seg_voc", seg) == "mIoU 23.12 (trivial: 8.181)"
    pretrain = {"loss": 5.1882, "corr_acc_eval": 0.5227, "lr": 0.0}
    assert headline("pretrain", pretrain) == "loss 5.188, corr_acc_eval 0.5227"


def test_the_summary_lists_every_finished_stage_of_every_job(tmp_path):
    for job, mIoU in (("seed=0", 21.0), ("seed=1", 25.0)):
        (tmp_path / job / "seg_voc").mkdir(parents=True)
        done = {"metrics": {"mIoU": mIoU, "mIoU_trivial": 8.0}, "seconds": 151.6}
        (tmp_path / job / "seg_voc" / "DONE.json").write_text(json.dumps(done))
    (tmp_path / "seed=1" / "det_voc").mkdir()  # started, not finished: no row
    jobs = {"seed=0": tmp_path / "seed=0", "seed=1": tmp_path / "seed=1"}
    table = summary_table(jobs, ["pretrain", "det_voc", "seg_voc"], "DONE.json").splitlines()
    assert table[2:] == ["| seed=0 | seg_voc | mIoU 21 (trivial: 8) | 152 s |",
                         "| seed=1 | seg_voc | mIoU 25 (trivial: 8) | 152 s |"]


def test_detectron2_details_reach_the_stage_file_but_not_the_terminal_unless_verbose(caplog):
    file_lines = []

    class StageFile(logging.Handler):  # what densecl.transfer.runner attaches to the detectron2 logger
        def emit(self, record):
            file_lines.append(record.getMessage())

    detectron2 = logging.getLogger("detectron2.engine.train_loop")
    handler = StageFile()
    logging.getLogger("detectron2").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO), detailed_logs_to_file_only(enabled=True):
            detectron2.info("Starting training from iteration 0")
            with warnings.catch_warnings(record=True) as shown:  # keeps the filters the stage set
                warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module="torch.jit._script")
                warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="densecl.training.pretrain")
        assert "Starting training" not in caplog.text and file_lines == ["Starting training from iteration 0"]
        assert [str(w.message) for w in shown] == ["ours"]  # a library's notice hidden, ours kept
        assert logging.getLogger("detectron2").propagate  # restored after the stage
        with caplog.at_level(logging.INFO), detailed_logs_to_file_only(enabled=False):  # verbose=true
            detectron2.info("Overall training speed")
        assert "Overall training speed" in caplog.text and file_lines[-1] == "Overall training speed"
    finally:
        logging.getLogger("detectron2").removeHandler(handler)

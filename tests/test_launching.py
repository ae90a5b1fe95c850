"""pipelines.launching: submitit's view of a job becomes torch.distributed's environment; no-op elsewhere."""

from __future__ import annotations

import os

import pytest

from densecl.distributed import env_from_variables
from pipelines import launching

TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SUBMITIT_KEYS = (
    "SUBMITIT_EXECUTOR",
    "SUBMITIT_FOLDER",
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_NTASKS",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SUBMITIT_LOCAL_JOB_ID",
    "SUBMITIT_LOCAL_NTASKS",
    "SUBMITIT_LOCAL_JOB_NUM_NODES",
    "SUBMITIT_LOCAL_NODEID",
    "SUBMITIT_LOCAL_GLOBALID",
    "SUBMITIT_LOCAL_LOCALID",
    "CUDA_VISIBLE_DEVICES",
    "TORCHELASTIC_RUN_ID",
)


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed or submitit variables; whatever the code under test exports is undone afterwards."""
    for key in TORCH_KEYS + SUBMITIT_KEYS:
        monkeypatch.setenv(key, "x")  # records the original value (or its absence) for the undo
        monkeypatch.delenv(key)
    return monkeypatch


def slurm_task(monkeypatch, procid: int, *, ntasks: int = 4, nodes: int = 2, job_id: str = "4242") -> None:
    """The variables SLURM and submitit's sbatch script set for one task of a 2-node, 4-task job."""
    per_node = ntasks // nodes
    for key in TORCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", job_id)
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_NODEID", str(procid // per_node))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(procid % per_node))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")


def test_not_distributed_is_rank_zero_and_export_is_a_no_op(clean_env):
    before = dict(os.environ)
    launching.export_distributed_env()
    assert dict(os.environ) == before
    assert launching.global_rank() == 0
    assert env_from_variables().world_size == 1  # what the engine reads
    assert launching.is_global_rank_zero()
    assert not launching.under_submitit()


def test_slurm_task_exports_torch_env(clean_env):
    slurm_task(clean_env, procid=3)
    assert launching.global_rank() == 3  # read from submitit before any export
    assert not launching.is_global_rank_zero()
    launching.export_distributed_env()
    assert os.environ["RANK"] == "3"
    assert os.environ["WORLD_SIZE"] == "4"
    assert os.environ["LOCAL_RANK"] == "1"
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"
    assert os.environ["MASTER_ADDR"] == "gpu07"  # first node of the job
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # SLURM's GPU list is kept
    assert launching.global_rank() == 3 and env_from_variables().world_size == 4


def test_all_tasks_of_a_job_agree_on_master_and_ranks_are_distinct(clean_env):
    seen = []
    for procid in range(4):
        slurm_task(clean_env, procid=procid)
        launching.export_distributed_env()
        seen.append({k: os.environ[k] for k in TORCH_KEYS})
    assert [s["RANK"] for s in seen] == ["0", "1", "2", "3"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "0", "1"]
    assert len({(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen}) == 1
    assert launching.is_global_rank_zero() is False  # last one is rank 3
    # another job on the same nodes gets another port (both may run at once)
    slurm_task(clean_env, procid=0, job_id="4243")
    launching.export_distributed_env()
    assert os.environ["MASTER_PORT"] != seen[0]["MASTER_PORT"]


def test_torchrun_variables_are_left_alone_even_under_submitit(clean_env):
    slurm_task(clean_env, procid=1)
    torchrun = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RUN_ID": "abc",
    }
    for k, v in torchrun.items():
        clean_env.setenv(k, v)
    launching.export_distributed_env()
    assert {k: os.environ[k] for k in torchrun} == torchrun
    assert launching.global_rank() == 5 and env_from_variables().world_size == 8


def test_rank_inherited_from_the_submitting_shell_is_replaced(clean_env):
    """sbatch exports the submitter's environment: a stray RANK=0 WORLD_SIZE=1 must not make every task rank 0."""
    slurm_task(clean_env, procid=3)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    assert launching.global_rank() == 3 and not launching.is_global_rank_zero()
    launching.export_distributed_env()
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4"


def test_torchrun_without_submitit(clean_env):
    clean_env.setenv("TORCHELASTIC_RUN_ID", "abc")
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    before = dict(os.environ)
    launching.export_distributed_env()
    assert dict(os.environ) == before
    assert launching.is_global_rank_zero() and env_from_variables().world_size == 2
    clean_env.setenv("RANK", "1")
    assert not launching.is_global_rank_zero()


def test_second_export_is_harmless(clean_env):
    slurm_task(clean_env, procid=2)
    launching.export_distributed_env()
    first = {k: os.environ[k] for k in TORCH_KEYS}
    launching.export_distributed_env()
    assert {k: os.environ[k] for k in TORCH_KEYS} == first


def _report_env():
    """Runs inside a submitit job: what a task function would see after exporting."""
    from pipelines import launching as lch

    rank_before = lch.global_rank()
    lch.export_distributed_env()
    return rank_before, {k: os.environ.get(k) for k in TORCH_KEYS}, lch.is_global_rank_zero()


def test_real_submitit_local_job_with_two_tasks(clean_env, tmp_path):
    """No fakes: submitit's local executor starts two tasks; each exports its own rank, one shared master."""
    submitit = pytest.importorskip("submitit")
    # the job unpickles `_report_env` by reference to this module: let it import it
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    clean_env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(tasks_per_node=2, timeout_min=2)
    job = executor.submit(_report_env)
    results = job.results()
    assert len(results) == 2
    ranks_before = sorted(r[0] for r in results)
    envs = sorted((r[1] for r in results), key=lambda e: e["RANK"])
    assert ranks_before == [0, 1]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" for e in envs)
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert sorted(r[2] for r in results) == [False, True]


def test_torch_threads_follow_the_slurm_cpu_allocation(clean_env, monkeypatch):
    import torch

    from pipelines.launching import apply_cpu_allocation

    before = torch.get_num_threads()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert apply_cpu_allocation() is None  # not a submitit job: leave the process alone
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    try:
        assert apply_cpu_allocation() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "two")
        with pytest.raises(ValueError, match="SLURM_CPUS_PER_TASK='two'"):
            apply_cpu_allocation()
    finally:
        torch.set_num_threads(before)

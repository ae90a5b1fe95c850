"""Rank and world size for jobs started by submitit (SLURM or local) or by torchrun.

With `hydra/launcher=submitit_slurm` and `tasks_per_node > 1`, SLURM starts one process per task and every
process runs the whole Hydra job. torch.distributed's `env://` initialisation (used by `densecl.training.pretrain`)
reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which SLURM does not set: `export_distributed_env`
translates submitit's view of the job (SLURM_PROCID, SLURM_NTASKS, the node list) into them. Tracking and
file writes must then happen on global rank 0 only: `is_global_rank_zero` answers that in every setting
(plain run, torchrun, submitit), before or after the export.
"""

from __future__ import annotations

import os

__all__ = [
    "apply_cpu_allocation",
    "export_distributed_env",
    "global_rank",
    "is_global_rank_zero",
    "launched_by_torchrun",
    "under_submitit",
]


def under_submitit() -> bool:
    """True inside a job started by submitit: its batch script exports SUBMITIT_EXECUTOR (slurm, local)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _job_env():
    """submitit's JobEnvironment for this process, or None outside a submitit job (it raises there)."""
    if not under_submitit():
        return None
    import submitit  # lazy: plain runs and the submitting process never need it

    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # SUBMITIT_EXECUTOR names no known plugin
        return None


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (torch.distributed.elastic), whose variables are authoritative."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def export_distributed_env() -> None:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from submitit.

    Call it at the start of the task function, before anything reads the rank. A no-op outside submitit and
    under torchrun (torchrun inside a job sets its own variables). Otherwise submitit's view wins: RANK or
    WORLD_SIZE inherited from the submitting shell (sbatch exports its environment) would make every task
    believe it is rank 0 of 1. Calling it twice is harmless. The master port comes from the job id (or an
    explicit MASTER_PORT), so every task of a job, and the same job after a requeue, agrees on it while
    two jobs on one node do not collide. CUDA_VISIBLE_DEVICES is left alone: SLURM already restricts it to
    the job's GPUs and the engine picks `cuda:LOCAL_RANK`.
    """
    if launched_by_torchrun():
        return
    if _job_env() is None:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def global_rank() -> int:
    """This process's global rank: torchrun's RANK, else submitit's task rank, else RANK, else 0."""
    env = None if launched_by_torchrun() else _job_env()
    if env is not None:
        return env.global_rank
    return int(os.environ.get("RANK", 0))


def is_global_rank_zero() -> bool:
    """True on the one process that should track runs and write shared files (also when not distributed)."""
    return global_rank() == 0


def apply_cpu_allocation() -> int | None:
    """Use as many torch threads as SLURM gave the task (SLURM_CPUS_PER_TASK), so that several tasks on one
    node do not each start one thread per core of the machine. Returns the thread count it set, if any."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not under_submitit() or not cpus:
        return None
    try:
        threads = int(cpus)
    except ValueError:
        raise ValueError(f"SLURM_CPUS_PER_TASK={cpus!r}: expected an integer") from None
    import torch

    torch.set_num_threads(threads)
    return threads

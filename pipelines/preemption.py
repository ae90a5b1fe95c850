"""Checkpoint-then-requeue on SLURM's preemption/timeout signal.

submitit's own handler for the signal (USR2, or $SUBMITIT_PREEMPT_SIGNAL) pickles the job, requeues it and
exits at once, wherever the training loop happens to be: everything since the last periodic checkpoint
would be lost. While pre-training runs, `GracefulStop` takes the signal instead and only records it; the
engine polls `requested()` after each iteration, writes a checkpoint and returns, and `hand_over()` then
calls submitit's handler, which requeues. The requeued job runs in the same job folder (job folders depend
only on the overrides) and the engine resumes from that checkpoint. Outside the context (downstream stages,
which checkpoint on their own schedule) submitit's handler acts directly. Outside submitit it does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from pipelines.launching import under_submitit

log = logging.getLogger(__name__)


def preemption_signal() -> signal.Signals:
    """The signal submitit's jobs treat as 'preempted or about to time out'."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def _any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank (the engine polls on every rank at the same iteration, so every
    rank must get the same answer or the collectives of the next iteration deadlock)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class GracefulStop:
    """Context manager; `requested` is the engine's should_stop, `hand_over` finishes the requeue."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = under_submitit() if enabled is None else enabled
        self.signum: int | None = None
        self.previous = None
        self._sig: signal.Signals | None = None

    def __enter__(self) -> GracefulStop:
        if self.enabled:
            self._sig = preemption_signal()
            self.previous = signal.getsignal(self._sig)
            signal.signal(self._sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self._sig is not None:
            signal.signal(self._sig, self.previous if self.previous is not None else signal.SIG_DFL)
            self._sig = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        log.warning(
            "received %s: checkpointing at the end of this iteration, then requeueing",
            signal.Signals(signum).name,
        )
        self.signum = signum

    def requested(self) -> bool:
        return self.enabled and _any_rank(self.signum is not None)

    def hand_over(self) -> None:
        """After the checkpoint: let submitit's handler requeue and exit (rank 0). Other ranks, whose
        submitit handler does nothing, exit here: the requeued job starts them again."""
        signum = self.signum if self.signum is not None else preemption_signal()
        log.warning("stopped for preemption; exiting so that the requeued job resumes")  # submitit's handler exits
        if callable(self.previous):
            self.previous(signum, None)
        sys.exit(-1)

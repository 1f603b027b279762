"""``dinodet train --slurm``: submit a command line as a SLURM job (through submitit) that requeues
itself with ``--resume`` on preemption or timeout.

The job relaunches an entry point it is given (the CLI passes its ``main``; submitit pickles a
module-level function by reference), so nothing here imports the CLI.  Every task of the job
exports the torch.distributed variables of the allocation; ``init_distributed`` does the rest.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: what a job runs: a command line (without the program name) -> exit status
EntryPoint = Callable[[list[str]], int]


@dataclass
class SlurmOptions:
    """The SLURM allocation of ``dinodet train --slurm`` (submitit parameters)."""

    nodes: int = 1
    gpus_per_node: int = 1  # one training process per GPU
    cpus_per_task: int = 8
    timeout_min: int = 24 * 60
    partition: str | None = None
    folder: str = "slurm"  # submitit logs, relative to the run folder


class SlurmJob:
    """What submitit runs on every task: export the torch.distributed variables of the SLURM
    allocation, then ``entry(argv)``.  Checkpointable: on preemption or timeout submitit requeues
    it with ``--resume`` so it continues from RUN_DIR/checkpoint.pt."""

    def __init__(self, argv: Sequence[str], entry: EntryPoint):
        self.argv = list(argv)
        self.entry = entry

    def __call__(self) -> int:
        import submitit

        # CUDA_VISIBLE_DEVICES untouched: init_distributed picks cuda:LOCAL_RANK itself
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        status = self.entry(self.argv)
        if status != 0:
            raise RuntimeError(f"dinodet {' '.join(self.argv)} exited with status {status}")
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmJob(resume_argv(self.argv), self.entry))


def resume_argv(argv: Sequence[str]) -> list[str]:
    """The command line that continues the run of ``argv``: with ``--resume`` added.  A
    ``--finetune-from`` stays: with ``--resume`` it only applies while the run has no checkpoint.pt
    yet (a job pre-empted before its first one starts again from those weights)."""
    return list(argv) if "--resume" in argv else [*argv, "--resume"]


def strip_slurm_args(argv: Sequence[str]) -> list[str]:
    """The command line without the --slurm* options (the job runs the rest as is)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--slurm" or (a.startswith("--slurm-") and "=" in a):
            continue
        if a.startswith("--slurm-"):
            skip = True
            continue
        out.append(a)
    return out


def submit_slurm(argv: Sequence[str], run_dir: str | os.PathLike, opts: SlurmOptions, entry: EntryPoint) -> str:
    """Submit ``entry(argv)`` (``argv`` without its --slurm* options) as a SLURM job of
    nodes x gpus_per_node processes; returns its id.

    Raises:
        ImportError: submitit is not installed (the caller turns it into a one-line error).
    """
    import submitit  # optional dependency

    executor = submitit.AutoExecutor(folder=str(Path(run_dir) / opts.folder))
    params: dict[str, Any] = {
        "name": "dinodet", "nodes": opts.nodes, "tasks_per_node": opts.gpus_per_node,
        "gpus_per_node": opts.gpus_per_node, "cpus_per_task": opts.cpus_per_task, "timeout_min": opts.timeout_min,
        "slurm_signal_delay_s": 120,  # time to reach the requeue handler before the kill
    }
    if opts.partition:
        params["slurm_partition"] = opts.partition
    executor.update_parameters(**params)
    job = executor.submit(SlurmJob(strip_slurm_args(argv), entry))
    return str(job.job_id)

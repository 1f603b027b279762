"""``dinodet.engine.slurm``: the job command line and its requeue (submitit is not needed)."""
from __future__ import annotations

import sys
import types

import pytest

from dinodet.engine.slurm import SlurmJob, SlurmOptions, resume_argv, strip_slurm_args, submit_slurm


def test_slurm_arguments_are_stripped_from_the_job_command():
    argv = ["train", "--data", "D", "--slurm", "--slurm-nodes", "2", "--slurm-partition=gpu", "--out", "R"]
    assert strip_slurm_args(argv) == ["train", "--data", "D", "--out", "R"]


def test_slurm_requeue_resumes_and_keeps_the_fine_tuning_start():
    """A requeued job resumes its run; --finetune-from stays for a job pre-empted before its first
    checkpoint (the Trainer applies it only when there is nothing to resume)."""
    argv = ["train", "--data", "D", "--finetune-from", "best.pt", "--out", "R", "--preset", "tiny"]
    assert resume_argv(argv) == [*argv, "--resume"]
    assert resume_argv(["train", "--resume"]) == ["train", "--resume"]


def entry(argv: list[str]) -> int:
    return 3 if "--fail" in argv else 0


def test_the_job_runs_the_entry_point_it_was_given(tmp_path, monkeypatch):
    exported = []
    fake = types.ModuleType("submitit")
    fake.helpers = types.SimpleNamespace(
        TorchDistributedEnvironment=lambda: types.SimpleNamespace(export=lambda **kw: exported.append(kw)),
        DelayedSubmission=lambda fn: types.SimpleNamespace(fn=fn))
    submitted = []
    fake.AutoExecutor = lambda folder: types.SimpleNamespace(
        update_parameters=lambda **p: None, submit=lambda job: submitted.append(job) or types.SimpleNamespace(job_id=7))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    assert SlurmJob(["train"], entry)() == 0 and exported
    with pytest.raises(RuntimeError, match="exited with status 3"):  # submitit then reports the job failed
        SlurmJob(["train", "--fail"], entry)()
    assert submit_slurm(["train", "--slurm", "--out", "R"], tmp_path, SlurmOptions(), entry) == "7"
    job = submitted[0]
    assert job.argv == ["train", "--out", "R"] and job.entry is entry
    assert job.checkpoint().fn.argv == ["train", "--out", "R", "--resume"] and job.checkpoint().fn.entry is entry

"""A job list fanned out over Ray: one task per group of jobs that share a clip's inversion.

``address`` names a running Ray cluster (``ray://head:10001``, ``auto``); without one a local
Ray is started in this process for the run (a Ray session the caller already opened is used as
it is). Each task runs ``runner.run_group`` -- exactly what
the run without Ray does -- on a worker that keeps its last model for its next task, so the
outputs and rows are the same. Where the cluster has GPUs each task takes one; on CPUs a task
takes as many cores as torch uses here, so a local Ray computes with the same thread count as
a run without it (CPU float sums depend on it) and never oversubscribes the cores.

Workers write the outputs themselves: on a cluster of several machines the clips and output
folders must be on storage they all see (as for any batch scheduler), and tokenflow must be
installed on every node.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TokenFlowError
from ..job import Log
from ..outputs import is_earlier_output
from .jobs import Job
from .runner import EvalSettings, ModelCache, OutputRow, describe_error, job_rows, run_group

_WORKER_MODELS = ModelCache()  # per Ray worker process: its last model, for its next task


@dataclass
class RaySettings:
    address: str | None = None  # None: start a local Ray in this process
    num_cpus: int | None = None  # CPUs of that local Ray (default: all of this machine's)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise TokenFlowError(
            "fanning out over Ray needs Ray: pip install 'tokenflow[ray]' (or run without ray)"
        ) from exc
    return ray


def _run_group_task(
    group: Sequence[Job], evaluation: EvalSettings | None, threads: int | None
) -> list[OutputRow]:
    """A Ray task: the group's jobs, as ``run_batch`` runs them without Ray."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return run_group(group, _WORKER_MODELS, log=lambda line: None, evaluation=evaluation)


def _task_resources(ray: Any) -> tuple[dict[str, float], int | None]:
    """One GPU per task where the cluster has GPUs; else this process's torch thread count."""
    import torch

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, None
    threads = max(1, min(torch.get_num_threads(), int(resources.get("CPU", 1))))
    return {"num_cpus": threads}, threads


def run_on_ray(
    groups: Sequence[Sequence[Job]],
    settings: RaySettings,
    evaluation: EvalSettings | None = None,
    log: Log = print,
    made: list[OutputRow] | None = None,
) -> list[OutputRow]:
    """Run every group as a Ray task; a task that dies fails its jobs' unfinished outputs.
    Each group's rows are also added to ``made`` as soon as its task ends."""
    ray = _import_ray()
    ours = not ray.is_initialized()  # a caller's own Ray session is used, and left running
    if ours and settings.address:
        ray.init(address=settings.address, log_to_driver=False)
    elif ours:
        ray.init(
            address="local",
            num_cpus=settings.num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        resources, threads = _task_resources(ray)
        task = ray.remote(_run_group_task).options(max_retries=1, **resources)
        pending = {task.remote(list(group), evaluation, threads): group for group in groups}
        rows: list[OutputRow] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # Ctrl-C stays live
            if not ready:
                continue
            group = pending.pop(ready[0])
            try:
                group_rows = ray.get(ready[0])
            except Exception as exc:  # the worker died (out of memory, a lost node)
                group_rows = [row for job in group for row in job_rows(job)]
                for row in group_rows:  # what it finished before is complete on disk
                    done = is_earlier_output(Path(row.out))
                    row.status = "done" if done else "failed"
                    row.error = "" if done else f"Ray task: {describe_error(exc)}"
            for row in group_rows:
                log(f"jobs[{row.job}]: {row.status} {row.error or row.out}")
            rows += group_rows
            if made is not None:
                made += group_rows
        return rows
    finally:
        if ours:
            ray.shutdown()

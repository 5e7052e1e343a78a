"""Many edits at once: a job list run with one model load per model and one inversion per
clip, locally or fanned out over Ray, with a summary row per output.

``load_jobs`` reads and checks a job list (``jobs.py``); ``run_batch`` runs it (``runner.py``,
``fanout.py`` for Ray); ``write_summary`` writes the table (``summary.py``). Several prompts on
one clip are one run of the engine either way (``pipeline.TokenFlowPipeline.edit_prompts``).
"""

from __future__ import annotations

from collections.abc import Callable

from ..job import Log
from ..progress import ProgressCallback
from .fanout import RaySettings, run_on_ray
from .jobs import Job, JobList, group_jobs, load_jobs, parse_shard, prompt_runs, shard
from .runner import (
    EvalSettings,
    ModelCache,
    OutputRow,
    bad_rows,
    check_jobs,
    job_rows,
    run_group,
    with_unfinished,
)
from .summary import counts, summary_stem, table, write_summary


def run_batch(
    job_list: JobList,
    *,
    ray: RaySettings | None = None,
    evaluation: EvalSettings | None = None,
    log: Log = print,
    progress_for: Callable[[Job], ProgressCallback | None] | None = None,
    made: list[OutputRow] | None = None,
) -> list[OutputRow]:
    """Run every good job of ``job_list`` (check it first: ``check_jobs``); the bad ones are
    failed rows. ``made``, when given, receives the rows as they are made (so a caller still
    has them if the run is stopped, see ``with_unfinished``). Returns one row per output, in
    list order."""
    made = [] if made is None else made
    for bad in job_list.bad:
        made += bad_rows(bad)
    groups = group_jobs(job_list.jobs)
    if ray is not None:
        run_on_ray(groups, ray, evaluation, log, made)
    else:
        models = ModelCache()
        for group in groups:
            run_group(group, models, log, progress_for, evaluation, made)
    return sorted(made, key=lambda row: row.job)


__all__ = [
    "EvalSettings",
    "Job",
    "JobList",
    "OutputRow",
    "RaySettings",
    "check_jobs",
    "counts",
    "job_rows",
    "load_jobs",
    "parse_shard",
    "prompt_runs",
    "run_batch",
    "shard",
    "summary_stem",
    "table",
    "with_unfinished",
    "write_summary",
]

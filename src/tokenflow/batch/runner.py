"""Running a job list: each model loaded once, each clip inverted once, a row per output.

Jobs run group by group (jobs that share a clip's inversion, see ``jobs.group_jobs``), so the
first job of a group inverts the clip into the cache and the others find it there. A job is one
run of all its prompts (``job.run_edits``). A failed job records its error in its rows and the
next job starts; only a stop request (Ctrl-C, ``progress.Cancelled``) ends the whole list.
Outputs can then be scored by ``tokenflow eval``'s own ``evaluate`` into the same rows.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import TokenFlowError
from ..families import DiffusionModel
from ..job import Log, load_job_model, preflight, run_edits
from ..memory import release_freed_memory
from ..metrics import DEFAULT_CLIP_MODEL
from ..progress import Cancelled, ProgressCallback
from .jobs import BadJob, Job, JobList, pending_runs

#: What happened to an output: made now, found complete, failed, or never reached.
STATUSES = ("done", "skipped", "failed", "not run")
SCORES = (
    "warp_error",
    "clip_text_score",
    "frame_consistency_consecutive",
    "frame_consistency_all_pairs",
)


@dataclass
class OutputRow:
    """One output of a job. A job's prompts are one run: its rows share time and evaluations."""

    job: int
    clip: str
    prompt: str
    out: str
    status: str = "not run"
    time_s: float | None = None
    unet_evaluations: int | None = None
    error: str = ""
    scores: dict[str, float | None] = field(default_factory=dict)


@dataclass
class EvalSettings:
    """How ``--eval`` scores the outputs (``tokenflow eval``'s settings)."""

    clip_model: str | None = DEFAULT_CLIP_MODEL
    flow: str | None = None
    flow_model: str | None = None
    device: str = "auto"


class ModelCache:
    """The model of the last job, kept for the next one that names the same."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: DiffusionModel | None = None

    def get(self, job: Job) -> DiffusionModel:
        key = job.model_key()
        if key != self.key or self.model is None:
            self.key = self.model = None  # free the previous model before loading the next
            gc.collect()
            release_freed_memory()
            self.model = load_job_model(job.options)
            self.key = key
        return self.model


def job_rows(job: Job) -> list[OutputRow]:
    return [OutputRow(job.index, run.input, run.prompt, run.out) for run in job.runs]


def bad_rows(bad: BadJob) -> list[OutputRow]:
    prompts = bad.prompts or [""]
    return [OutputRow(bad.index, bad.clip, p, bad.out, "failed", error=bad.error) for p in prompts]


def describe_error(exc: BaseException) -> str:
    """A user error's own message; anything else (a bug) its type and message."""
    if isinstance(exc, TokenFlowError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_job(
    job: Job,
    models: ModelCache,
    log: Log = print,
    progress: ProgressCallback | None = None,
) -> list[OutputRow]:
    """Run the job's prompts whose outputs are not complete yet, in one run."""
    rows = job_rows(job)
    todo = pending_runs(job)
    for row in rows:
        if row.out not in {run.out for run in todo}:
            row.status = "skipped"
    if not todo:
        log(f"jobs[{job.index}]: skipped, its outputs are complete ({job.out})")
        return rows
    log(f"jobs[{job.index}]: {job.options.input}, {_prompts(len(todo))} -> {job.out}")
    clock = time.perf_counter()
    status, error, evaluations = "done", "", None
    try:
        reports = run_edits(todo, progress, log, models.get(job))
        evaluations = sum(reports[0].result.unet_evaluations.values())
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # one failed job never stops the others
        if not isinstance(exc, TokenFlowError):
            log("".join(traceback.format_exception(exc)).rstrip())
        status, error = "failed", describe_error(exc)
    elapsed = round(time.perf_counter() - clock, 3)
    for row in rows:
        if row.status != "skipped":
            row.status, row.error, row.time_s = status, error, elapsed
            row.unet_evaluations = evaluations
    log(f"jobs[{job.index}]: {status} in {elapsed:.1f} s{f': {error}' if error else ''}")
    return rows


def _prompts(count: int) -> str:
    return f"{count} prompt{'s' if count > 1 else ''}"


def score_rows(rows: Sequence[OutputRow], settings: EvalSettings) -> None:
    """Score every existing output with ``tokenflow eval``'s ``evaluate``, one call per clip and
    prompt; a failure is noted in the rows' error, the edits keep their status."""
    from ..evaluation import evaluate

    pairs: dict[tuple[str, str], list[OutputRow]] = {}
    for row in rows:
        if row.status in ("done", "skipped"):
            pairs.setdefault((row.clip, row.prompt), []).append(row)
    for (clip, prompt), scored in pairs.items():
        try:
            report = evaluate(
                source=clip,
                edited=[row.out for row in scored],
                prompt=prompt,
                flow=settings.flow,
                flow_model=settings.flow_model,
                clip_model=settings.clip_model,
                device=settings.device,
            )
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            for row in scored:
                row.error = f"eval: {describe_error(exc)}"
            continue
        for row, result in zip(scored, report.rows, strict=True):
            values = {name: getattr(result, name) for name in SCORES}
            # JSON has no NaN: an undefined score (every pixel occluded) is left empty
            row.scores = {
                k: v if v is not None and math.isfinite(v) else None for k, v in values.items()
            }


def run_group(
    group: Sequence[Job],
    models: ModelCache,
    log: Log = print,
    progress_for: Callable[[Job], ProgressCallback | None] | None = None,
    evaluation: EvalSettings | None = None,
    made: list[OutputRow] | None = None,
) -> list[OutputRow]:
    """Run jobs that share a clip's inversion, then score their outputs if asked. Each job's
    rows are also added to ``made`` as soon as it ends (for a summary of a stopped run)."""
    rows: list[OutputRow] = []
    for job in group:
        progress = progress_for(job) if progress_for is not None else None
        rows += run_job(job, models, log, progress)
        if made is not None:
            made += rows[-job.size :]
    if evaluation is not None:
        score_rows(rows, evaluation)
    return rows


def with_unfinished(job_list: JobList, rows: list[OutputRow]) -> list[OutputRow]:
    """``rows`` plus "not run" rows for every job that has none (a stopped run), in order."""
    seen = {row.job for row in rows}
    missing = [row for job in job_list.jobs if job.index not in seen for row in job_rows(job)]
    missing += [row for bad in job_list.bad if bad.index not in seen for row in bad_rows(bad)]
    return sorted(rows + missing, key=lambda row: row.job)


def check_jobs(job_list: JobList) -> JobList:
    """Every job with all checks that need no decoding (``job.preflight``) on its outputs still
    to make; a job that fails them joins the bad ones. Nothing is written."""
    jobs, bad = [], list(job_list.bad)
    for job in job_list.jobs:
        try:
            for run in pending_runs(job):
                preflight(run)
        except TokenFlowError as exc:
            message = f"jobs[{job.index}]: {exc}"
            prompts = [run.prompt for run in job.runs]
            bad.append(BadJob(job.index, message, job.options.input, prompts, job.out))
        else:
            jobs.append(job)
    bad.sort(key=lambda b: b.index)
    return JobList(job_list.path, jobs, bad)

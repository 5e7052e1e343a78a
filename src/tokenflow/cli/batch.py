"""``tokenflow batch JOBS.yaml``: run a job list, resumably, locally, on Ray or as one shard."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TokenFlowError, render_options
from .evaluate import _cli_clip_error, _clip_model_arg
from .progress import ProgressDisplay

if TYPE_CHECKING:
    from ..batch import EvalSettings, Job

_DESCRIPTION = """\
Run a job list: each job is a clip, one or more prompts and any edit options
(defaults at the top of the file). The model is loaded once, jobs on the same
clip share its inversion, and a job's prompts are one run (see `tokenflow edit
--prompt A --prompt B`). Every job is checked before any work and each bad one
is reported with its index and option; it is then failed without stopping the
others, as is a job that fails while running. Outputs that are complete (their
run.json) are skipped, so running the same list again resumes it. A summary
table (CSV + JSON: job, clip, prompt, status, time, UNet evaluations, output,
error, and the scores with --eval) is written beside the job list. The exit
code is 1 when a job failed.
"""

_EXAMPLE = """\
example job list (keys are the edit options of `tokenflow edit --help`, as in --config):

  defaults:
    inversion_prompt: a wolf
    steps: 50
  jobs:
    - clip: clips/wolf.mp4
      prompt: a fox
      out: results/wolf-fox
    - clip: clips/wolf.mp4
      prompts: [a red fox, a husky]    # one run: results/wolf/a-red-fox/, .../a-husky/
      out: results/wolf
    - clip: clips/woman-running.mp4
      inversion_prompt: a woman running
      prompt: a marble sculpture of a woman running
      out: results/marble

  tokenflow batch jobs.yaml                       # here, one job after another
  tokenflow batch jobs.yaml --ray                 # a local Ray: one task per clip
  tokenflow batch jobs.yaml --ray ray://head:10001 --eval
  tokenflow batch jobs.yaml --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT
"""


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from ..metrics import DEFAULT_CLIP_MODEL, FLOW_METHODS

    parser.description = _DESCRIPTION
    parser.epilog = _EXAMPLE
    parser.add_argument("jobs", type=Path, metavar="JOBS.yaml", help="the job list")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the jobs as Ray tasks, one per clip (one GPU each where the cluster has GPUs),"
        " on the Ray cluster at ADDRESS (e.g. ray://head:10001, auto), or on a local Ray"
        " started here without one; needs pip install 'tokenflow[ray]'. On a cluster of"
        " several machines clips and outputs must be on storage all of them see",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run only shard I of N (1-based): a deterministic split of the list (jobs on one"
        " clip stay together), every job in exactly one shard; for job arrays (SLURM ...)",
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="score every output as `tokenflow eval` does, into the same summary",
    )
    parser.add_argument(
        "--clip-model",
        type=_clip_model_arg,
        default=DEFAULT_CLIP_MODEL,
        metavar="ID_OR_DIR",
        help=f"--eval: the CLIP model (default {DEFAULT_CLIP_MODEL}; 'none' skips CLIP scores)",
    )
    parser.add_argument("--flow", choices=FLOW_METHODS, default=None, help="--eval: optical flow")
    parser.add_argument(
        "--flow-model", type=Path, default=None, metavar="PATH", help="--eval: RAFT"
    )
    parser.add_argument(
        "--summary",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the summary to PATH.csv and PATH.json (default: beside the job list,"
        " JOBS.summary.csv/.json, or JOBS.shard-I-of-N.summary.* with --shard)",
    )
    parser.add_argument("--quiet", action="store_true", help="only errors and the summary path")


def _as_keys(text: str) -> str:
    """A library message with its option names (and a job's own keys) as the job file's keys."""
    from ..batch.jobs import JOB_KEYS

    text = render_options(text, lambda option: option)
    return re.sub(rf"`({'|'.join(JOB_KEYS)})`", r"\1", text)


def _check_evaluation(args: argparse.Namespace) -> EvalSettings | None:
    """``--eval``'s settings, checked before any edit where the scoring will run (not for a
    Ray cluster's workers): a CLIP model that cannot be loaded or a missing RAFT file fails
    now, not after hours of editing."""
    if not args.eval:
        return None
    from ..batch import EvalSettings
    from ..metrics import ClipScorer, ClipUnavailableError, resolve_flow

    if args.ray:
        return EvalSettings(args.clip_model, args.flow, args.flow_model)
    resolve_flow(args.flow, args.flow_model, "cpu")
    if args.clip_model is not None:
        try:
            ClipScorer(args.clip_model, "cpu")
        except ClipUnavailableError as exc:
            raise _cli_clip_error(exc) from exc
    return EvalSettings(args.clip_model, args.flow, args.flow_model)


def run_batch_command(args: argparse.Namespace, session) -> int:
    from ..batch import (
        RaySettings,
        check_jobs,
        counts,
        load_jobs,
        parse_shard,
        run_batch,
        shard,
        summary_stem,
        table,
        with_unfinished,
        write_summary,
    )

    part = parse_shard(args.shard) if args.shard else None
    stem = args.summary or summary_stem(args.jobs, part)
    if not stem.expanduser().parent.is_dir():
        raise TokenFlowError(f"cannot write the summary {stem}: no folder {stem.parent}")
    job_list = load_jobs(args.jobs)
    if part is not None:
        job_list = shard(job_list, *part)
    if not args.ray:  # here (or a local Ray): every check of this machine, before any work
        job_list = check_jobs(job_list)
    for bad in job_list.bad:
        print(f"error: {_as_keys(bad.error)}", file=sys.stderr)
    evaluation = _check_evaluation(args)

    def log(line: str) -> None:
        if not args.quiet:
            (session.display.note if session.display else print)(_as_keys(line))

    def progress_for(job: Job):
        display = session.display = ProgressDisplay(
            steps=job.options.steps,
            inversion_steps=job.options.inversion_steps,
            block_size=job.options.block_size,
            prompts=job.size,
            enabled=not args.quiet,
        )

        def progress(stage: str, done: int, total: int) -> None:
            session.worker.check()
            display(stage, done, total)

        return progress

    made: list = []
    meta = {"jobs": str(args.jobs), "shard": args.shard, "ray": args.ray}
    try:
        if args.ray is not None:  # Ray waits in this thread, where Ctrl-C stops it at once
            ray = RaySettings(address=args.ray or None)
            run_batch(job_list, ray=ray, evaluation=evaluation, log=log, made=made)
        else:
            session.worker.run(
                lambda: run_batch(
                    job_list, evaluation=evaluation, log=log, progress_for=progress_for, made=made
                )
            )
    finally:
        session.clear()
        rows = with_unfinished(job_list, made)
        paths = write_summary(rows, stem, meta, scored=evaluation is not None)
    if not args.quiet:
        print(table(rows))
    tally = counts(rows)
    print(", ".join(f"{n} {status}" for status, n in tally.items() if n) + f"; wrote {paths[0]}")
    return 1 if tally["failed"] else 0

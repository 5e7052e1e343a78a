"""The ``tokenflow`` command: edit, invert, cache, info, eval.

A thin layer over the library: flags are generated from ``EditOptions``, the job runs with a
progress display, and a ``TokenFlowError`` becomes one ``error:`` line (its option names shown
as flags) with exit code 2 instead of a traceback.

Under ``torchrun`` every rank runs the command; only rank 0 shows progress, notes and the one
error line, which names the rank at fault when another rank failed or died (exit code 1).

Ctrl-C and SIGTERM stop a job at once (exit codes 130 and 143). The job runs in a worker thread
so the main thread is always free to take the signal, even while the worker is inside one long
native call (a UNet or VAE call on a large frame can take minutes on a CPU, and Python cannot
interrupt it). The job is asked to stop at its next progress report, i.e. after the current
UNet or VAE call; if that call does not end within ``STOP_GRACE_S``, the partial outputs are
removed from here and the process ends without waiting for it. Either way nothing
half-written is left, the inversion cache is untouched, and the error line starts on its own
line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .. import __version__, distributed
from ..atomic import discard_pending
from ..errors import TokenFlowError
from ..options import FIELD_INFO
from ..progress import Cancelled
from .batch import add_batch_arguments, run_batch_command
from .cache import add_cache_arguments, run_cache
from .evaluate import add_eval_arguments, run_eval
from .flags import (
    add_option_flags,
    as_flags,
    flag_for,
    inversion_options,
    options_from_args,
    runs_from_args,
)
from .info import add_info_arguments, run_info
from .progress import ProgressDisplay
from .ui import add_ui_arguments, run_ui

EDIT_EXAMPLES = """examples:
  tokenflow edit clip.mp4 --prompt "a marble sculpture of a woman running" \\
      --inversion-prompt "a woman running" --out results/marble
  tokenflow edit clip.mov --start 2s --end 6s --stride 2 --size 672x384 --fit crop \\
      --prompt "a watercolor painting" --inversion-prompt "a dog" --out results/dog
  tokenflow edit clip.mp4 --method sdedit --strength 0.8 --prompt "..." --out results/sdedit
  tokenflow edit clip.mp4 --controlnet lllyasviel/sd-controlnet-canny --control canny \\
      --model runwayml/stable-diffusion-v1-5 --prompt "..." --out results/canny
  tokenflow edit frames/ --fps 24 --model ./my-sd15-folder --prompt "..." --out out/
  tokenflow edit --config results/marble/run.json --out results/again   # reproduce a run
  tokenflow edit clip.mp4 --prompt "a fox" --prompt "a husky" --inversion-prompt "a wolf" \\
      --out results/wolf    # one run for both: results/wolf/a-fox/, results/wolf/a-husky/
"""


STOP_GRACE_S = 1.0  # how long a stopped job may take to finish its current call


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


class JobThread:
    """Runs a job in a worker thread that can be told to stop (see the module docstring)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def check(self) -> None:
        """Called by the job between calls: ends it once a stop was asked for."""
        if self.stop.is_set():
            raise Cancelled("stopped on request")

    def run(self, job: Callable[[], Any]) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return job()  # no signals to take here: run it in place
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = job()
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

        self.thread = threading.Thread(target=work, name="tokenflow-job", daemon=True)
        self.thread.start()
        try:
            while self.thread.is_alive():
                self.thread.join(0.1)
        except KeyboardInterrupt:
            self.stop.set()
            self.thread.join(STOP_GRACE_S)
            if self.thread.is_alive():  # inside a long native call: clean up from here
                discard_pending()
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    @property
    def stuck(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one ``error:`` line, not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML file of options (or an earlier run.json); flags override it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress, notes or warnings")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenflow",
        description="Text-driven video editing with TokenFlow (Stable Diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"tokenflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    edit = sub.add_parser(
        "edit", help="edit a video with a prompt", epilog=EDIT_EXAMPLES, formatter_class=fmt
    )
    add_option_flags(edit, FIELD_INFO, repeated=("prompt",))
    _add_job_flags(edit)

    invert = sub.add_parser(
        "invert",
        help="precompute a clip's DDIM inversion into the cache",
        formatter_class=fmt,
        epilog="example:\n  tokenflow invert clip.mp4 --inversion-prompt 'a woman running'\n",
    )
    add_option_flags(invert, inversion_options())
    _add_job_flags(invert)

    add_cache_arguments(sub.add_parser("cache", help="list, measure or clear the inversion cache"))
    add_info_arguments(
        sub.add_parser("info", help="versions, device, cache location, model availability")
    )
    add_eval_arguments(
        sub.add_parser(
            "eval",
            help="warp error and CLIP scores of edited videos",
            formatter_class=fmt,
            epilog="example:\n  tokenflow eval --source a.mp4 --edited out/a out/b --prompt ...\n",
        )
    )
    add_batch_arguments(
        sub.add_parser(
            "batch",
            help="run a job list (clips x prompts): resumable, optionally over Ray or sharded",
            formatter_class=fmt,
        )
    )
    add_ui_arguments(
        sub.add_parser(
            "ui",
            help="a web UI on this machine (preview, edit, cancel, history)",
            formatter_class=fmt,
            epilog="example:\n  tokenflow ui --model ./my-sd21 --outputs results\n",
        )
    )
    return parser


def _quiet(args: argparse.Namespace) -> bool:
    """``--quiet``, or a rank other than 0 of a torchrun launch (rank 0 speaks for all)."""
    return getattr(args, "quiet", False) or distributed.launch_rank() not in (None, 0)


def _display(args: argparse.Namespace, options, prompts: int = 1) -> ProgressDisplay:
    return ProgressDisplay(
        prompts=prompts,
        steps=options.steps,
        inversion_steps=options.inversion_steps,
        block_size=options.block_size,
        enabled=not _quiet(args),
    )


def _run_job(
    args: argparse.Namespace,
    session: _Session,
    job: Callable[..., Any],
    options: Any = None,
    prompts: int = 1,
) -> Any:
    """Run ``job(options, progress=, log=)`` in the session's stoppable thread, with a display
    (``options``: those of the flags, unless given)."""
    options = options or options_from_args(args)
    display = session.display = _display(args, options, prompts)

    def progress(stage: str, done: int, total: int) -> None:
        session.worker.check()
        display(stage, done, total)

    def log(line: str) -> None:
        display.note(as_flags(line))

    result = session.worker.run(lambda: job(options, progress=progress, log=log))
    display.finish()
    return result


def _cmd_edit(args: argparse.Namespace, session: _Session) -> int:
    from ..job import run_edit, run_edits

    runs = runs_from_args(args)

    def edit(options, progress, log):  # one prompt: also a preview, see run_edit
        if len(runs) == 1:
            return [run_edit(options, progress, log)]
        return run_edits(runs, progress, log)

    for report in _run_job(args, session, edit, runs[0], len(runs)):
        session.display.note(f"wrote {report.out} ({report.info['wall_time_s']:.1f} s)")
    return 0


def _cmd_invert(args: argparse.Namespace, session: _Session) -> int:
    from ..job import run_invert

    _run_job(args, session, run_invert)
    return 0


COMMANDS = {
    "edit": _cmd_edit,
    "invert": _cmd_invert,
    "cache": lambda args, _: run_cache(args),
    "info": lambda args, _: run_info(args),
    "eval": lambda args, _: run_eval(args),
    "batch": run_batch_command,
    "ui": lambda args, _: run_ui(args),
}


@contextlib.contextmanager
def _signals_stop_the_job() -> Iterator[None]:
    """SIGTERM raises like Ctrl-C while a command runs (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {as_flags(str(message))}", file=sys.stderr)


def _speaks(error: TokenFlowError) -> bool:
    """Whether this process prints ``error``: over several ranks, rank 0 reports its own
    errors and the rank that reports a ``RankFailure`` reports that; the others are silent."""
    if isinstance(error, distributed.RankFailure):
        return error.speaker
    return distributed.launch_rank() in (None, 0)


def _stopped(how: str, code: int) -> tuple[str | None, int]:
    """The line (None: say nothing) and exit code of a run stopped by Ctrl-C or SIGTERM; over
    several ranks, a stop caused by another rank's failure names that rank instead."""
    verdict = distributed.stopped_by_signal(how)
    cause, speaker = verdict if verdict is not None else (None, True)
    if cause is not None:
        return (as_flags(cause) if speaker else None), distributed.RankFailure.exit_code
    line = f"{how}: partial outputs removed, cache untouched"
    return (line if speaker else None), code


class _Session:
    """One command's running state: its job thread and progress display."""

    def __init__(self) -> None:
        self.worker = JobThread()
        self.display: ProgressDisplay | None = None

    def clear(self) -> None:
        """Take any live bar off the screen so an error line starts on a line of its own."""
        if self.display is not None:
            self.display.close()
        sys.stderr.flush()


_last_session: _Session | None = None


def main(argv: list[str] | None = None) -> int:
    global _last_session
    args = build_parser().parse_args(argv)
    session = _last_session = _Session()
    if args.command != "edit" and distributed.launch_world() > 1:
        if distributed.launch_rank() == 0:
            print(
                f"error: only `tokenflow edit` runs over several ranks; run `tokenflow"
                f" {args.command}` as one process, without torchrun",
                file=sys.stderr,
            )
        return 2
    # scoped, so --quiet or the one-line format never leak into a caller that imports main
    with warnings.catch_warnings(), _signals_stop_the_job():
        warnings.showwarning = _one_line_warnings
        if _quiet(args):
            warnings.simplefilter("ignore")
        try:
            return COMMANDS[args.command](args, session)
        except TokenFlowError as exc:
            session.clear()
            if _speaks(exc):
                print(f"error: {exc.render(flag_for)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            session.clear()
            how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            line, code = _stopped(how, 143 if isinstance(exc, Terminated) else 130)
            if line is not None:
                print(f"error: {line}", file=sys.stderr)
            return code


def entry() -> None:
    """The ``tokenflow`` console script. After Ctrl-C or SIGTERM the process ends at once (the
    outputs are already cleaned up): a stopped job may still be inside a native call, and the
    interpreter's own shutdown would wait for it or trip over its threads. A rank of a torchrun
    launch that failed ends at once too (its process group cannot be taken down cleanly), and
    a rank other than 0 never prints a traceback (rank 0's line names it)."""
    try:
        code = main()
    except SystemExit:  # argparse's own exits (--help, --version, a bad flag) on every rank
        raise
    except BaseException:
        if not distributed.launched():
            raise
        if distributed.launch_rank() == 0:
            traceback.print_exc()
        code = 1
    stopped = code in (130, 143) or (_last_session is not None and _last_session.worker.stuck)
    if code == 0 and distributed.launched():
        distributed.leave()
    elif stopped or distributed.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

"""Running jobs for the web UI: one at a time on the device, with live progress and Cancel.

A job runs ``job.run_edit`` (a preview or a full edit) in a worker thread. Its progress
callback feeds the CLI's ``ProgressDisplay`` (stage, units done / total, and the estimate of
the time left), which the page polls; it is also where Cancel takes effect: once asked, the
next report raises ``progress.Cancelled``, so the job ends within one UNet or VAE call, and
the job's own clean-up removes its staging folder (the inversion cache is only ever written
whole). The model is loaded once per process and kept, keyed by what it was loaded with.
"""

from __future__ import annotations

import io
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..cli.progress import ProgressDisplay, _clock
from ..errors import TokenFlowError, first_line, render_options
from ..families import DiffusionModel
from ..loading import resolve_device, resolve_dtype
from ..options import FIELD_INFO, EditOptions
from ..progress import STAGES, Cancelled
from .form import label, render_error

Work = Callable[..., Any]  # ``work(options, progress=, log=, model=)``, e.g. ``job.run_edit``


class ModelCache:
    """The loaded model, kept between jobs; a change of any model setting (model, VAE, LoRA,
    device, dtype ...) replaces it."""

    def __init__(self, loader: Callable[[EditOptions], DiffusionModel] | None = None) -> None:
        self.loader = loader
        self.key: tuple | None = None
        self.model: DiffusionModel | None = None
        self.loads = 0  # how many times a model was loaded (the UI keeps it)

    @staticmethod
    def key_for(options: EditOptions) -> tuple:
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        settings = tuple(
            (name, getattr(options, name))
            for name, info in FIELD_INFO.items()
            if info.group == "model" and name not in ("device", "dtype")
        )
        return (*settings, str(device), str(dtype))

    def get(self, options: EditOptions) -> DiffusionModel:
        key = self.key_for(options)
        if self.model is None or key != self.key:
            from ..job import load_job_model

            self.model = None  # free the old one before loading the next
            self.model = (self.loader or load_job_model)(options)
            self.key = key
            self.loads += 1
        return self.model


@dataclass
class Job:
    """One job's state, shared between its worker thread and the page polling it."""

    options: EditOptions
    session: str
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    stage: str | None = None
    units: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.log_stream = io.StringIO()
        self.display = ProgressDisplay(
            steps=self.options.steps,
            inversion_steps=self.options.inversion_steps,
            block_size=self.options.block_size,
            stream=self.log_stream,
        )

    def progress(self, stage: str, done: int, total: int) -> None:
        """The job's progress callback: record, and stop here once Cancel was pressed."""
        if self.cancel.is_set():
            raise Cancelled("cancelled")
        self.stage, self.units = stage, (done, total)
        self.display(stage, done, total)

    def log(self, line: str) -> None:
        self.notes.append(render_options(line, lambda name: f"“{label(name)}”"))

    def status(self) -> str:
        """One line: the stage, units done / total, time elapsed and the estimate of time left."""
        elapsed = _clock(time.perf_counter() - self.started)
        if self.stage is None:
            return f"starting · elapsed {elapsed}"
        done, total = self.units
        unit = STAGES.get(self.stage, "unit")
        left = self.display.remaining()
        eta = "estimating" if left is None else _clock(left)
        return f"{self.stage}: {done}/{total} {unit}s · elapsed {elapsed} · left {eta}"

    def log_text(self) -> str:
        """The finished stages' summaries and the job's notes, as the CLI prints them."""
        return "\n".join([*self.notes, *self.log_stream.getvalue().splitlines()])


class JobRunner:
    """Runs jobs one at a time (the device lock) and lets a session cancel its own job."""

    def __init__(self, models: ModelCache | None = None) -> None:
        self.models = models or ModelCache()
        self.device = threading.Lock()
        self.jobs: dict[str, Job] = {}  # the latest job of each session
        self._lock = threading.Lock()

    def start(
        self,
        work: Work,
        options: EditOptions,
        session: str,
        prepare: Callable[[EditOptions], EditOptions] | None = None,
    ) -> Job:
        """Start ``work`` in a worker thread. ``prepare`` (e.g. picking the output folder)
        runs once the device is free, so it sees what earlier jobs left."""
        job = Job(options, session)
        with self._lock:
            self.jobs[session] = job
        thread = threading.Thread(
            target=self._run, args=(job, work, prepare), name="tokenflow-ui-job", daemon=True
        )
        thread.start()
        return job

    def _run(self, job: Job, work: Work, prepare) -> None:
        try:
            with self.device, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if job.cancel.is_set():
                    raise Cancelled("cancelled")
                from ..job import preflight

                options = prepare(job.options) if prepare is not None else job.options
                job.options = options
                preflight(options)  # a bad setting fails before the model loads
                model = self.models.get(options)
                job.result = work(options, progress=job.progress, log=job.log, model=model)
                for warning in caught:
                    job.log(f"warning: {warning.message}")
        except Cancelled:
            job.cancelled = True
        except TokenFlowError as exc:
            job.error = render_error(exc)
        except Exception as exc:  # a bug: one line in the page, the traceback in the server log
            traceback.print_exc()
            job.error = f"internal error ({type(exc).__name__}): {first_line(exc)}"
        finally:
            with self._lock:  # the page that started it keeps it; the runner lets it go
                if self.jobs.get(job.session) is job:
                    del self.jobs[job.session]
            job.done.set()

    def watch(self, job: Job, interval: float = 0.25) -> Iterator[str]:
        """The job's status line every ``interval`` seconds until it ends."""
        while not job.done.wait(interval):
            yield job.status()

    def cancel(self, session: str, wait: float = 60.0) -> Job | None:
        """Stop ``session``'s running job and wait (up to ``wait`` s) until it has ended."""
        with self._lock:
            job = self.jobs.get(session)
        if job is None or job.done.is_set():
            return None
        job.cancel.set()
        job.done.wait(wait)
        return job

    @property
    def busy(self) -> bool:
        return self.device.locked()

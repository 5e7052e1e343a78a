"""Job lists: a YAML file of edits, each a clip, one or more prompts and any edit options.

```yaml
defaults:                      # any edit option, for every job
  inversion_prompt: a wolf
  steps: 50
jobs:
  - clip: clips/wolf.mp4
    prompt: a fox              # one prompt: its output folder is `out`
    out: results/wolf-fox
  - clip: clips/wolf.mp4
    prompts: [a red fox, a husky]   # several: `out/<slug of the prompt>/` each, one run
    out: results/wolf
```

Every job is checked before any work -- its keys, option types, ranges and choices (by the
options model itself), that its clip exists, its model source, device and output folders -- and
each bad job is reported with its index and the option at fault. The bad jobs are then failed
without stopping the good ones. A job's output folder that holds a complete edit (its
``run.json``) is skipped, so running a list again resumes it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TokenFlowError
from ..options import FIELD_INFO, EditOptions, OptionError, OptionInfo, read_config_file
from ..outputs import is_earlier_output

#: Keys of a job besides edit options: its clip and its prompts.
JOB_KEYS = ("clip", "prompt", "prompts")
SLUG_LENGTH = 60


def prompt_slug(prompt: str) -> str:
    """A folder name for a prompt: lower-case ASCII words joined by ``-`` (at most 60 chars)."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:SLUG_LENGTH].rstrip("-") or "prompt"


def prompt_folders(prompts: Sequence[str]) -> list[str]:
    """One distinct folder name per prompt: its slug, with ``-2``, ``-3`` ... on a clash."""
    folders: list[str] = []
    for prompt in prompts:
        slug, n = prompt_slug(prompt), 1
        while (name := slug if n == 1 else f"{slug}-{n}") in folders:
            n += 1
        folders.append(name)
    return folders


def prompt_runs(options: EditOptions, prompts: Sequence[str]) -> list[EditOptions]:
    """The options of each prompt's output: one prompt writes to ``out``, several each to
    ``out/<slug of the prompt>``. Each reproduces its output alone (as its run.json does)."""
    if not prompts:
        raise OptionError("no `prompt` given: edit at least one")
    if len(prompts) == 1:
        return [options.replace(prompt=prompts[0])]
    options.require("out")
    folders = prompt_folders(prompts)
    return [
        options.replace(prompt=p, out=str(Path(options.out) / folder))
        for p, folder in zip(prompts, folders, strict=True)
    ]


@dataclass
class Job:
    """One entry of a job list: its prompts' runs (options that differ in prompt and out)."""

    index: int
    runs: list[EditOptions]
    out: str  # as the job gives it (several prompts: the folder of their folders)

    @property
    def options(self) -> EditOptions:
        return self.runs[0]

    @property
    def size(self) -> int:
        return len(self.runs)

    def group_key(self) -> tuple:
        """Jobs with equal keys share the inversion and the model: the options that shape the
        inversion (clip, frame selection and size, model, steps, ControlNet, cache)."""
        return self._values(lambda info: info.inversion)

    def model_key(self) -> tuple:
        """Jobs with equal keys run on one loaded model."""
        return self._values(lambda info: info.group == "model")

    def _values(self, chosen: Callable[[OptionInfo], bool]) -> tuple:
        values = self.options.to_dict()
        return tuple((name, values[name]) for name, info in FIELD_INFO.items() if chosen(info))


@dataclass
class BadJob:
    """A job that failed its checks: its index, why, and what it names (as far as readable)."""

    index: int
    error: str
    clip: str = ""
    prompts: list[str] = field(default_factory=list)
    out: str = ""


@dataclass
class JobList:
    path: Path
    jobs: list[Job]
    bad: list[BadJob]

    @property
    def count(self) -> int:
        return len(self.jobs) + len(self.bad)


def _prompts(entry: dict[str, Any], defaults: dict[str, Any], where: str) -> list[str]:
    if "prompt" in entry and "prompts" in entry:
        raise OptionError(f"{where}: give `prompt` or `prompts`, not both")
    value = entry.get("prompts", entry.get("prompt", defaults.get("prompt")))
    values = [value] if isinstance(value, str) else value
    if not values or not isinstance(values, list):
        raise OptionError(f"{where}: no `prompt` given (one text, or a list as `prompts`)")
    for i, prompt in enumerate(values):
        if not isinstance(prompt, str) or not prompt.strip():
            raise OptionError(f"{where}: prompt {i} is {prompt!r}, not a text")
    return values


def _job(index: int, entry: Any, defaults: dict[str, Any]) -> Job:
    where = f"jobs[{index}]"
    if not isinstance(entry, dict):
        raise TokenFlowError(f"{where} is {entry!r}: a job is a mapping of setting: value")
    if "input" in entry:
        raise OptionError(f"{where}: a job names its video as `clip`, not `input`")
    if not entry.get("clip"):
        raise OptionError(f"{where}: no `clip` (the video file or frames folder to edit)")
    prompts = _prompts(entry, defaults, where)
    settings = {k: v for k, v in {**defaults, **entry}.items() if k not in JOB_KEYS}
    settings["input"] = entry["clip"]
    options = EditOptions.from_mapping(settings, where=where)
    try:
        runs = prompt_runs(options.require("out"), prompts)
        for run in runs:
            run.validate()
    except TokenFlowError as exc:
        raise type(exc)(f"{where}: {exc.args[0]}") from exc
    return Job(index, runs, options.out)


def _bad(index: int, entry: Any, defaults: dict[str, Any], error: TokenFlowError) -> BadJob:
    """What can be read of a bad job, for its row in the summary."""
    entry = entry if isinstance(entry, dict) else {}
    value = entry.get("prompts", entry.get("prompt", defaults.get("prompt")))
    prompts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    out = entry.get("out", defaults.get("out"))
    clip = str(entry.get("clip") or "")
    return BadJob(index, str(error), clip, [str(p) for p in prompts], str(out or ""))


def load_jobs(path: str | Path) -> JobList:
    """Read and check a job list. A file that cannot be read as one raises; each bad job is
    kept as a ``BadJob`` (reported before any work) and the good ones as ``Job``s."""
    path = Path(path)
    data = read_config_file(path, "job list")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise TokenFlowError(f"job list {path}: needs a `jobs:` list (and optional `defaults:`)")
    unknown = sorted(set(data) - {"defaults", "jobs"})
    if unknown:
        raise TokenFlowError(f"job list {path}: unknown key {unknown[0]!r} (use defaults, jobs)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TokenFlowError(f"job list {path}: `defaults` must be a mapping of setting: value")
    if "clip" in defaults:
        raise TokenFlowError(f"job list {path}: `clip` belongs to each job, not to defaults")
    # the defaults alone must be valid settings, so their errors are named once, as theirs
    EditOptions.from_mapping(
        {k: v for k, v in defaults.items() if k not in JOB_KEYS}, where=f"job list {path}: defaults"
    )
    jobs, bad = [], []
    taken: dict[Path, int] = {}  # output folders of the jobs so far
    for index, entry in enumerate(data["jobs"]):
        try:
            job = _job(index, entry, defaults)
            _check_own_folder(job, taken)
            jobs.append(job)
        except TokenFlowError as exc:
            bad.append(_bad(index, entry, defaults, exc))
    return JobList(path, jobs, bad)


def _check_own_folder(job: Job, taken: dict[Path, int]) -> None:
    """Two jobs writing one folder (or one inside the other) would clash: the later is bad."""
    out = Path(job.out).expanduser().resolve()
    for other, index in taken.items():
        if out == other or other in out.parents or out in other.parents:
            raise OptionError(
                f"jobs[{job.index}]: `out` {job.out} is, holds or lies in the output of"
                f" jobs[{index}]; give each job a folder of its own"
            )
    taken[out] = job.index


def is_complete(options: EditOptions) -> bool:
    """Whether ``options.out`` already holds a finished edit (its run.json)."""
    return is_earlier_output(Path(options.out))


def pending_runs(job: Job) -> list[EditOptions]:
    """The job's runs still to do: complete outputs are skipped unless it sets `overwrite`."""
    return [run for run in job.runs if run.overwrite or not is_complete(run)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) as (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise TokenFlowError(f"shard {text!r}: write I/N with 1 <= I <= N, e.g. 2/8")
    return int(match[1]), int(match[2])


def group_jobs(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs by shared inversion (and model), each group and its jobs in list order; groups of
    the same model next to each other, so a run loads each model once."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group_key(), []).append(job)
    models = list(dict.fromkeys(g[0].model_key() for g in groups.values()))
    return sorted(groups.values(), key=lambda g: models.index(g[0].model_key()))


def shard(job_list: JobList, index: int, count: int) -> JobList:
    """Shard ``index`` of ``count`` (1-based): a deterministic split with no coordinator.

    Whole groups (jobs sharing a clip's inversion) go to one shard, largest first, each to
    the shard with the fewest outputs so far (ties: the lowest), so every job lands in exactly
    one shard and shards get about equal work. Bad jobs go to shard ``index % count``.
    """
    loads = [0] * count
    owner: dict[int, int] = {}
    groups = group_jobs(job_list.jobs)
    order = sorted(range(len(groups)), key=lambda g: (-sum(j.size for j in groups[g]), g))
    for g in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += sum(j.size for j in groups[g])
        owner[g] = target
    mine = index - 1
    jobs = [job for g, group in enumerate(groups) if owner[g] == mine for job in group]
    jobs.sort(key=lambda job: job.index)
    bad = [b for b in job_list.bad if b.index % count == mine]
    return JobList(job_list.path, jobs, bad)

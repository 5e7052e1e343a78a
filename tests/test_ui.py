"""The web UI's plumbing without a browser: progress and Cancel, the generated form, history,
path confinement and the login requirement off localhost."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tokenflow import EditOptions
from tokenflow.cli import main
from tokenflow.errors import TokenFlowError
from tokenflow.options import FIELDS, OptionError
from tokenflow.progress import StageProgress
from tokenflow.ui.form import (
    SERVER_SIDE,
    advanced,
    form_names,
    form_values,
    options_from_form,
    render_error,
)
from tokenflow.ui.history import list_runs, new_run_folder, run_settings
from tokenflow.ui.runner import Job, JobRunner, ModelCache
from tokenflow.ui.safety import (
    AUTH_ENV,
    FileGuard,
    confine,
    is_local,
    parse_auth,
    parse_size,
    required_auth,
)

# -- progress and Cancel ---------------------------------------------------------------------


class FakeModels(ModelCache):
    """A model cache that loads nothing (the runner's plumbing is what is tested)."""

    def __init__(self) -> None:
        super().__init__(loader=lambda options: object())


@pytest.fixture
def runner(monkeypatch, tmp_path):
    monkeypatch.setattr("tokenflow.job.preflight", lambda options: None)
    return JobRunner(FakeModels())


def stepping(units: int, pause: float = 0.01, reached: threading.Event | None = None):
    """A job that reports ``units`` edit steps, like the pipeline's progress callback."""

    def work(options, progress, log, model):
        stage = StageProgress(progress, "edit", units)
        for i in range(units):
            time.sleep(pause)
            stage.advance()
            if reached is not None and i == units // 2:
                reached.set()
        log("note: `block_size` was fine")
        return "report"

    return work


def test_progress_reaches_the_page_as_stage_units_and_time_left(runner):
    job = runner.start(stepping(20, pause=0.02), EditOptions(), "s1")
    lines = list(runner.watch(job, interval=0.05))
    assert job.result == "report" and job.error is None and not job.cancelled
    assert lines and all(line.startswith(("starting", "edit: ")) for line in lines)
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines if line.startswith("edit")]
    assert counts == sorted(counts) and counts[-1] <= 20
    assert any("/20 frame-steps" in line and "left " in line for line in lines)
    assert "note: “Block size” was fine" in job.log_text()  # option names as labels


def test_cancel_stops_the_job_at_its_next_progress_report(runner):
    halfway = threading.Event()
    job = runner.start(stepping(1000, pause=0.005, reached=halfway), EditOptions(), "s1")
    assert halfway.wait(30)
    assert runner.cancel("other-session") is None  # only a session's own job
    assert runner.cancel("s1", wait=30) is job
    assert job.cancelled and job.done.is_set() and job.result is None
    assert job.units[0] < 1000  # it stopped, it did not run to the end
    assert not runner.busy
    assert runner.cancel("s1") is None  # nothing left to cancel
    again = runner.start(stepping(3), EditOptions(), "s1")  # the next job runs
    list(runner.watch(again, interval=0.01))
    assert again.result == "report"


def test_one_job_at_a_time(runner):
    inside, overlap = [], []

    def work(options, progress, log, model):
        inside.append(1)
        overlap.append(len(inside))
        time.sleep(0.05)
        inside.pop()

    jobs = [runner.start(work, EditOptions(), f"s{i}") for i in range(4)]
    for job in jobs:
        assert job.done.wait(30)
    assert overlap == [1, 1, 1, 1]


def test_errors_are_one_line_naming_the_field(runner, monkeypatch):
    def failing(options, progress, log, model):
        raise OptionError("`block_size` 0 must be at least 1")

    job = runner.start(failing, EditOptions(), "s1")
    job.done.wait(30)
    assert job.error == "“Block size” 0 must be at least 1"

    def buggy(options, progress, log, model):
        raise RuntimeError("boom\nmore")

    job = runner.start(buggy, EditOptions(), "s1")
    job.done.wait(30)
    assert job.error == "internal error (RuntimeError): boom"
    job = runner.start(stepping(2), EditOptions(), "s1")  # and the next job works
    job.done.wait(30)
    assert job.result == "report"


def test_the_model_is_loaded_once_per_model_device_and_dtype():
    models = FakeModels()
    first = models.get(EditOptions(model="a", device="cpu"))
    assert models.get(EditOptions(model="a", device="cpu", dtype="float32")) is first
    assert models.loads == 1
    models.get(EditOptions(model="b", device="cpu"))
    assert models.loads == 2


def test_a_cancelled_job_raises_from_its_progress_callback():
    from tokenflow.progress import Cancelled

    job = Job(EditOptions(), "s")
    job.progress("edit", 1, 4)
    job.cancel.set()
    with pytest.raises(Cancelled):
        job.progress("edit", 2, 4)
    assert job.units == (1, 4)


# -- the form ----------------------------------------------------------------------------------


def test_every_option_is_in_the_form_or_set_by_the_server():
    shown = form_names()
    assert len(shown) == len(set(shown))
    assert set(shown) | SERVER_SIDE == set(FIELDS)
    assert not set(shown) & SERVER_SIDE
    assert "block_size" in advanced()["diffusion"]  # generated, by help group


def test_the_form_round_trips_options():
    names = form_names()
    options = EditOptions(
        prompt="a fox", frames=12, size="64x64", start="1.5s", method="sdedit", strength=0.7,
        block_size=4, device="cpu", baseline="per-frame", keyframe_memory=None,
    )  # fmt: skip
    assert options_from_form(names, form_values(names, options)) == options
    values = dict(zip(names, form_values(names, EditOptions()), strict=True))
    assert values["frames"] == "" and values["device"] == "auto" and values["baseline"] == ""
    values.update(frames="7", block_size=3.0, fps="12.5")
    parsed = options_from_form(names, list(values.values()))
    assert (parsed.frames, parsed.block_size, parsed.fps, parsed.baseline) == (7, 3, 12.5, None)
    values["frames"] = "seven"
    with pytest.raises(OptionError, match="frames"):
        options_from_form(names, list(values.values()))


def test_errors_name_fields_by_their_labels_on_one_line():
    error = OptionError("`inversion_steps` 4 is fewer than `steps` 50:\n use 500")
    assert render_error(error) == "“Inversion steps” 4 is fewer than “Steps” 50: use 500"


# -- history -----------------------------------------------------------------------------------


def _run(folder: Path, prompt: str, when: float) -> Path:
    folder.mkdir(parents=True)
    run = folder / "run.json"
    run.write_text(json.dumps({"tokenflow": "0.1.0", "config": {"prompt": prompt, "steps": 3}}))
    import os

    os.utime(run, (when, when))
    return folder


def test_history_lists_runs_newest_first_and_loads_their_settings(tmp_path):
    outputs = tmp_path / "outputs"
    _run(outputs / "old", "a fox", 1000)
    _run(outputs / "new", "a cat", 2000)
    _run(outputs / ".staging", "hidden", 3000)
    (outputs / "stray").mkdir()  # not a run
    runs = list_runs(outputs)
    assert [r.prompt for r in runs] == ["a cat", "a fox"]
    assert run_settings(outputs, runs[1].folder) == EditOptions(prompt="a fox", steps=3)
    elsewhere = _run(tmp_path / "elsewhere", "x", 1)
    with pytest.raises(TokenFlowError):
        run_settings(outputs, elsewhere)
    with pytest.raises(TokenFlowError):
        run_settings(outputs, outputs / "new" / ".." / ".." / "elsewhere")
    first = new_run_folder(outputs, "A Fox, in the snow!", now=5000)
    first.mkdir()
    second = new_run_folder(outputs, "A Fox, in the snow!", now=5000)
    assert first.name.endswith("-a-fox-in-the-snow") and second.name == first.name + "-2"


# -- where files may come from -------------------------------------------------------------------


def test_paths_are_confined_to_the_ui_folders(tmp_path):
    uploads, outputs = tmp_path / "uploads", tmp_path / "outputs"
    for folder in (uploads, outputs):
        folder.mkdir()
    inside = uploads / "clip.mp4"
    inside.write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    (uploads / "link").symlink_to(secret)
    roots = [uploads, outputs]
    assert confine(inside, roots) == inside.resolve()
    for path in (secret, uploads / ".." / "secret.txt", uploads / "link", "/etc/passwd"):
        with pytest.raises(TokenFlowError):
            confine(path, roots)
    with pytest.raises(TokenFlowError):
        confine(uploads / "missing.mp4", roots)


def test_file_requests_outside_the_folders_or_for_urls_are_refused(tmp_path):
    guard = FileGuard(app=None, roots=[tmp_path])
    ok = f"/gradio_api/file={tmp_path}/run/edited.mp4"
    assert guard.allows(ok) and guard.allows("/gradio_api/queue/join")
    for path in (
        "/gradio_api/file=/etc/passwd",
        f"/gradio_api/file={tmp_path}/../secret",
        "/gradio_api/file=https://example.com/a.png",
        "/gradio_api/file=//example.com/a.png",
        "/gradio_api/file=relative/path",
        "/gradio_api/file=%2Fetc%2Fpasswd",
    ):
        assert not guard.allows(path), path


def test_uploads_must_decode_as_video(tmp_path, data_dir):
    pytest.importorskip("gradio")
    from tokenflow.ui.app import check_upload

    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"not a video at all" * 100)
    assert check_upload(str(data_dir / "wolf.mp4")) is None
    problem = check_upload(str(fake))
    assert problem.startswith("the upload is not a video that can be read")
    assert "\n" not in problem


# -- who may connect ---------------------------------------------------------------------------


def test_off_localhost_a_login_is_required(monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.4")
    assert required_auth("127.0.0.1", None) is None
    with pytest.raises(TokenFlowError, match="--auth"):
        required_auth("0.0.0.0", None)
    assert required_auth("0.0.0.0", "me:pa:ss") == ("me", "pa:ss")
    monkeypatch.setenv(AUTH_ENV, "env:secret")
    assert required_auth("0.0.0.0", None) == ("env", "secret")
    for bad in ("nopassword", ":x", "x:"):
        with pytest.raises(TokenFlowError):
            parse_auth(bad)
    assert parse_size("2GB") == 2 * 1024**3 == parse_size("2g")
    assert parse_size("500 MB") == 500 * 1024**2 and parse_size(1024) == 1024


def test_the_ui_command_refuses_another_host_without_a_login(monkeypatch, capsys):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: binding 0.0.0.0") and "--auth" in error
    assert len(error.strip().splitlines()) == 1

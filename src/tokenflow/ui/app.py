"""The Gradio app of ``tokenflow ui``: clip, prompts, preview, edit, cancel, history.

The page is a thin front end over the library: the form is generated from ``EditOptions``
(``form.py``), jobs are ``job.run_edit`` run by ``runner.JobRunner`` one at a time (the Gradio
queue's concurrency 1, and a device lock), and every run's output folder is the CLI's, so
``tokenflow edit --config run.json`` reproduces it. Nothing leaves the machine: no analytics,
no share link, no fonts or scripts from elsewhere, and files are confined by ``safety.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio reads it
import gradio as gr  # noqa: E402

from ..errors import TokenFlowError  # noqa: E402
from ..job import run_edit  # noqa: E402
from ..options import FIELD_INFO, EditOptions, check_size_text, value_type
from ..video import parse_time, probe_video, read_clip
from ..video.sizing import Sizing
from .form import SECTIONS, advanced, component, form_names, form_values, options_from_form
from .form import render_error as render
from .history import list_runs, new_run_folder, run_settings
from .runner import JobRunner
from .safety import DEFAULT_MAX_UPLOAD, FileGuard, confine

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".gif", ".m4v")
DEVICE = "device"  # the Gradio concurrency group of everything that runs the model
CSS = "#status {min-height: 2.5em} footer {display: none !important}"


@dataclass
class UIConfig:
    """What the server decides: its folders, the model and the form's defaults."""

    outputs: Path  # runs are written here (and listed as history)
    workdir: Path  # this process's uploads, previews and downloads
    base: EditOptions = field(default_factory=EditOptions)  # server-side options + defaults
    clips: list[Path] = field(default_factory=list)  # folders of clips offered to pick from
    max_upload: int = DEFAULT_MAX_UPLOAD

    @property
    def uploads(self) -> Path:
        return self.workdir / "uploads"

    @property
    def roots(self) -> list[Path]:
        """Every folder the browser may reach, through uploads, downloads or picks."""
        return [self.workdir, self.outputs, *self.clips]

    def prepare(self) -> None:
        """Create the folders and point Gradio's caches into them (before building the app)."""
        for folder in (self.outputs, self.uploads, self.workdir / "previews"):
            folder.mkdir(parents=True, exist_ok=True)
        self.workdir, self.outputs = self.workdir.resolve(), self.outputs.resolve()
        self.clips = [c.resolve() for c in self.clips]
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        os.environ["GRADIO_TEMP_DIR"] = str(self.uploads)
        os.environ["GRADIO_EXAMPLES_CACHE"] = str(self.workdir / "examples")


# -- what the handlers compute (no Gradio here) -------------------------------------------------


def clip_summary(
    path: str | None, config: UIConfig, values: dict[str, Any], short_side: int = 512
) -> str:
    """The clip's fps, frame count, size and duration, and the working size and frame count
    the Clip settings give, before anything runs."""
    if not path:
        return "Upload a clip, or pick one."
    try:
        info = probe_video(confine(path, config.roots, "clip"))
        fps, frames = info["fps"] or 10.0, int(info["frames"])
        duration = info["duration"] or frames / fps
        source = (
            f"**Clip:** {info['width']}×{info['height']}, {fps:g} fps, {frames} frames,"
            f" {duration:.1f} s"
        )
        size = values.get("size")
        sizing = Sizing(
            check_size_text(size) if size else None,
            values.get("fit") or "crop",
            int(values.get("short_side") or short_side),
        ).check()
        width, height = sizing.plan((info["width"], info["height"])).target
        count = _selected(frames, fps, values)
        return f"{source}  \n**Working:** {width}×{height}, about {count} frames"
    except TokenFlowError as exc:
        return f"error: {render(exc)}"


def _selected(frames: int, fps: float, values: dict[str, Any]) -> int:
    """About how many frames start/end/stride/frames keep (from the header's count)."""

    def position(text: Any, default: int) -> int:
        if text in (None, ""):
            return default
        value = parse_time(str(text), fps)
        return value if isinstance(value, int) else round(value * fps)

    start = position(values.get("start"), 0)
    end = min(position(values.get("end"), frames), frames)
    count = max(0, math.ceil((end - start) / max(1, int(values.get("stride") or 1))))
    return min(count, int(values["frames"])) if values.get("frames") else count


def check_upload(path: str | None) -> str | None:
    """Why an upload cannot be edited (it must decode as video), or None."""
    if not path:
        return None
    try:
        read_clip(path, max_frames=1, size=(64, 64))
    except TokenFlowError as exc:
        return f"the upload is not a video that can be read: {render(exc)}"
    except Exception as exc:  # a decoder's own error: still one line
        return f"the upload is not a video that can be read ({type(exc).__name__})"
    return None


def offered_clips(config: UIConfig) -> list[tuple[str, str]]:
    """The clips in the configured folders, and earlier runs' inputs that are still here."""
    found: dict[str, str] = {}
    for folder in config.clips:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                found[str(path)] = path.name
    for run in list_runs(config.outputs):
        source = (run.info.get("config") or {}).get("input")
        if source and Path(source).is_file() and _inside(Path(source), config):
            found.setdefault(str(Path(source).resolve()), f"recent: {Path(source).name}")
    return [(name, path) for path, name in found.items()]


def _inside(path: Path, config: UIConfig) -> bool:
    try:
        confine(path, config.roots)
    except TokenFlowError:
        return False
    return True


def history_items(config: UIConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The history gallery (thumbnail, caption) and the run folder of each item."""
    items, folders = [], []
    for run in list_runs(config.outputs):
        thumbnail = run.thumbnail or next(iter(sorted((run.folder / "frames").glob("*.png"))), None)
        if thumbnail is not None:
            items.append((str(thumbnail), run.caption))
            folders.append(str(run.folder))
    return items, folders


def archive(folder: Path, config: UIConfig) -> Path:
    """The whole output folder as a zip, for download (beside the uploads, not in the run)."""
    target = config.workdir / "downloads" / f"{uuid.uuid4().hex[:8]}" / folder.name
    target.parent.mkdir(parents=True, exist_ok=True)
    name = shutil.make_archive(str(target), "zip", root_dir=folder.parent, base_dir=folder.name)
    return Path(name)


# -- the page -------------------------------------------------------------------------------------


def build_app(config: UIConfig, runner: JobRunner | None = None):
    """The Gradio Blocks of the UI (``config.prepare()`` must have run)."""
    runner = runner or JobRunner()
    names = form_names()
    base = config.base
    fields: dict[str, Any] = {}

    with gr.Blocks(title="tokenflow", analytics_enabled=False) as demo:
        gr.Markdown(
            "## tokenflow: edit a video with a text prompt\n"
            f"TokenFlow on `{_model_name(base.model)}`. Preview a few frames first, then edit"
            " the whole clip."
        )
        selected_run = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                gr.Markdown("### Clip")
                video = gr.Video(label="Clip", sources=["upload"], elem_id="clip", height=260)
                pick = gr.Dropdown(
                    choices=offered_clips(config), value=None, label="Or pick a clip",
                    elem_id="pick", allow_custom_value=False,
                )  # fmt: skip
                clip_info = gr.Markdown("Upload a clip, or pick one.", elem_id="clip-info")
                with gr.Row():
                    for name in SECTIONS["clip"][:4]:
                        fields[name] = component(gr, name, getattr(base, name), min_width=90)
                with gr.Row():
                    for name in SECTIONS["clip"][4:]:
                        fields[name] = component(gr, name, getattr(base, name), min_width=90)
                gr.Markdown("### Prompts")
                for name in SECTIONS["prompts"]:
                    fields[name] = component(gr, name, getattr(base, name), lines=1)
                with gr.Row():
                    for name in SECTIONS["method"]:
                        fields[name] = component(gr, name, getattr(base, name))
                control = None
                if base.controlnet:
                    control = gr.Dropdown(
                        choices=["canny", "depth"], value=base.control or "canny",
                        label="ControlNet control", info=FIELD_INFO["control"].help,
                    )  # fmt: skip
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    for group, members in advanced().items():
                        shown = group != "control" or bool(base.controlnet)  # used with one only
                        gr.Markdown(f"**{group_title(group)}**", visible=shown)
                        switches = [n for n in members if value_type(n) is bool]
                        rows = ([n for n in members if n not in switches], switches)
                        for row in filter(None, rows):
                            with gr.Row(equal_height=False):  # checkboxes in a row of their own
                                for name in row:
                                    fields[name] = component(
                                        gr, name, getattr(base, name), visible=shown,
                                        min_width=240,
                                    )  # fmt: skip
            with gr.Column(scale=6):
                with gr.Row():
                    preview_button = gr.Button("Preview", elem_id="preview-button")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Preview", id="preview-tab"):
                        gallery = gr.Gallery(
                            label="Preview frames", columns=4, height=320, elem_id="preview"
                        )
                        preview_note = gr.Markdown("", elem_id="preview-note")
                    with gr.Tab("Result", id="result-tab"):
                        with gr.Row():
                            result = gr.Video(label="Edited", elem_id="result", height=260)
                            side = gr.Video(label="Side by side", elem_id="side", height=260)
                        downloads = gr.File(
                            label="Downloads", file_count="multiple", elem_id="downloads",
                            interactive=False,
                        )  # fmt: skip
                        log = gr.Textbox(label="Log", lines=6, elem_id="log")
                    with gr.Tab("History", id="history-tab"):
                        refresh = gr.Button("Refresh", size="sm", elem_id="history-refresh")
                        history = gr.Gallery(
                            value=history_items(config)[0], label="Runs, newest first",
                            columns=4, height="auto", elem_id="history", allow_preview=False,
                            object_fit="contain",
                        )  # fmt: skip
                        run_info = gr.Markdown("", elem_id="history-info")
                        load = gr.Button("Load settings", elem_id="load-settings")

        inputs = [video, *(fields[n] for n in names)] + ([control] if control else [])

        def options_of(clip: str | None, values: tuple) -> EditOptions:
            changes = dict(zip(names, values[: len(names)], strict=True))
            options = options_from_form(names, list(changes.values()), base)
            if control is not None:
                options = options.replace(control=values[len(names)])
            if not clip:
                raise TokenFlowError("no clip yet: upload one or pick one")
            return options.replace(input=str(confine(clip, config.roots, "clip")))

        model = runner.models.model
        short_side = model.default_short_side if model is not None else 512

        def summary(clip, *values):
            values = dict(zip(SECTIONS["clip"], values, strict=True))
            return clip_summary(clip, config, values, short_side)

        clip_fields = [fields[n] for n in SECTIONS["clip"]]
        for trigger in [video.change, *(f.change for f in clip_fields)]:
            trigger(summary, [video, *clip_fields], clip_info, queue=False)

        def uploaded(clip):
            problem = check_upload(clip)
            if problem:
                return None, f"error: {problem}"
            return gr.skip(), "Clip ready."

        video.upload(uploaded, video, [video, status], queue=False)

        def picked(path):
            if not path:
                return gr.skip()
            return str(confine(path, config.roots, "clip"))

        pick.change(picked, pick, video, queue=False)

        def start(kind: str, clip, values, request: gr.Request):
            options = options_of(clip, values)
            session = getattr(request, "session_hash", None) or "local"
            if kind == "preview":
                out = config.workdir / "previews" / f"{session}-{uuid.uuid4().hex[:6]}"
                return runner.start(run_edit, options.replace(preview=0, out=str(out)), session)
            return runner.start(
                # a page never resumes a stopped run: it keeps no step checkpoints
                run_edit, options.replace(preview=None, overwrite=False, checkpoint=False), session,
                prepare=lambda o: o.replace(out=str(new_run_folder(config.outputs, o.prompt))),
            )  # fmt: skip

        def ended(job) -> str | None:
            if job.cancelled:
                return (
                    "Cancelled: stopped within one UNet call; nothing was written and the cache"
                    " is intact. Ready for the next job."
                )
            if job.error:
                return f"error: {job.error}"
            return None

        def preview(request: gr.Request, clip, *values):
            try:
                job = start("preview", clip, values, request)
            except TokenFlowError as exc:
                yield f"error: {render(exc)}", gr.skip(), gr.skip()
                return
            for line in runner.watch(job):
                yield line, gr.skip(), gr.skip()
            problem = ended(job)
            if problem:
                yield problem, gr.skip(), gr.skip()
                return
            frames = sorted((job.result.out / "frames").glob("*.png"))
            images = [(str(p), f"frame {int(p.stem)}") for p in frames]
            note = job.result.info["preview"]["note"]
            yield f"Preview done: {len(images)} frames.", images, note

        def edit(request: gr.Request, clip, *values):
            skip = (gr.skip(),) * 6
            try:
                job = start("edit", clip, values, request)
            except TokenFlowError as exc:
                yield f"error: {render(exc)}", *skip
                return
            for line in runner.watch(job):
                yield line, *skip
            problem = ended(job)
            if problem:
                yield problem, *skip[:-1], job.log_text()
                return
            out = job.result.out
            files = [str(out / "edited.mp4"), str(archive(out, config))]
            items, folders = history_items(config)
            yield (
                f"Done: wrote {out.name} ({job.result.info['wall_time_s']:.1f} s).",
                str(out / "edited.mp4"), str(out / "side_by_side.mp4"), files, items, folders[:1],
                job.log_text(),
            )  # fmt: skip

        preview_event = preview_button.click(
            preview, inputs, [status, gallery, preview_note],
            concurrency_limit=1, concurrency_id=DEVICE, show_progress="minimal",
        )  # fmt: skip
        edit_event = edit_button.click(
            edit, inputs, [status, result, side, downloads, history, selected_run, log],
            concurrency_limit=1, concurrency_id=DEVICE, show_progress="minimal",
        )  # fmt: skip
        del preview_event, edit_event

        def cancel(request: gr.Request):
            job = runner.cancel(getattr(request, "session_hash", None) or "local")
            if job is None:
                return "Nothing is running."
            return gr.skip()  # the job's own handler says how it ended

        cancel_button.click(cancel, None, status, queue=False)

        def refreshed():
            items, folders = history_items(config)
            return items, folders[:1], _describe(folders[:1])

        refresh.click(refreshed, None, [history, selected_run, run_info], queue=False)

        def chosen(evt: gr.SelectData):
            folders = history_items(config)[1]
            picked_folders = folders[evt.index : evt.index + 1]
            return picked_folders, _describe(picked_folders)

        history.select(chosen, None, [selected_run, run_info], queue=False)

        def load_settings(folders):
            if not folders:
                return "Pick a run in the history first.", *(gr.skip(),) * len(inputs)
            try:
                options = run_settings(config.outputs, folders[0])
            except TokenFlowError as exc:
                return f"error: {render(exc)}", *(gr.skip(),) * len(inputs)
            source = options.input and Path(options.input)
            clip = str(source) if source and source.is_file() and _inside(source, config) else None
            values = form_values(names, options)
            extra = [options.control or "canny"] if control is not None else []
            note = f"Loaded the settings of {Path(folders[0]).name}."
            return note, clip or gr.skip(), *values, *extra

        load.click(load_settings, selected_run, [status, *inputs], queue=False)
        demo.load(refreshed, None, [history, selected_run, run_info], queue=False)
    return demo


def _describe(folders: list[str]) -> str:
    if not folders:
        return "No runs yet."
    run = next((r for r in list_runs(Path(folders[0]).parent) if str(r.folder) == folders[0]), None)
    if run is None:
        return ""
    config = run.info.get("config") or {}
    return (
        f"**{run.folder.name}**: “{run.prompt}”, method {config.get('method')},"
        f" {(run.info.get('input') or {}).get('frames')} frames"
    )


def _model_name(model: str) -> str:
    """A Hub id as it is; a local model by its folder or file name (never a server path)."""
    from ..hub import local_path

    return Path(model).name if local_path(model) is not None else model


def group_title(group: str) -> str:
    from ..options import GROUPS

    return GROUPS[group].capitalize()


def launch(demo, config: UIConfig, host: str = "127.0.0.1", port: int = 7860, auth=None) -> str:
    """Serve ``demo``: the queue runs one job at a time, files are confined to the UI's folders,
    uploads are limited, nothing is shared or reported. Returns the local URL."""
    from starlette.middleware import Middleware

    demo.queue(default_concurrency_limit=1, max_size=64)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
        prevent_thread_lock=True, quiet=True, show_error=False,
        allowed_paths=[str(root) for root in config.roots], max_file_size=config.max_upload,
        enable_monitoring=False, run_history=False, footer_links=[], ssr_mode=False,
        mcp_server=False, pwa=False, css=CSS,
        app_kwargs={"middleware": [Middleware(FileGuard, roots=config.roots)]},
    )  # fmt: skip
    return url

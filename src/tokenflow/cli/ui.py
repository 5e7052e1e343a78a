"""``tokenflow ui``: the web UI, served on this machine until Ctrl-C.

The model flags are the edit command's (generated from ``EditOptions``); ``--config`` fills
the form's defaults. The model is loaded once, before the URL is printed, and kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .flags import add_option_flags, options_from_args


def server_options() -> list[str]:
    """The options the server decides (every one that names a file, folder or model: the
    browser never names a path on the server), plus the device and dtype to load on."""
    from ..options import FIELDS
    from ..ui.form import JOB_SWITCHES, SERVER_SIDE

    chosen = [n for n in FIELDS if n in SERVER_SIDE and n not in JOB_SWITCHES]
    return chosen + ["device", "dtype"]


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser, server_options())
    web = parser.add_argument_group("web server")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    web.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    web.add_argument(
        "--outputs", default="tokenflow-outputs", help="folder of the runs (default: %(default)s)"
    )
    web.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="login required to use the UI (needed off localhost; or set TOKENFLOW_UI_AUTH)",
    )
    web.add_argument(
        "--max-upload", default="2GB", metavar="SIZE", help="largest upload (default: 2GB)"
    )
    web.add_argument(
        "--clips", action="append", default=[], metavar="DIR",
        help="a folder of clips offered to pick from (repeatable)",
    )  # fmt: skip
    parser.add_argument("--config", help="YAML file (or run.json) of the form's defaults")


def run_ui(args: argparse.Namespace) -> int:
    """Check the settings, load the model, serve the UI and print its URL."""
    from ..errors import TokenFlowError
    from ..families import check_model_source
    from ..ui.safety import is_local, parse_size, required_auth

    auth = required_auth(args.host, args.auth)
    max_upload = parse_size(args.max_upload)
    base = options_from_args(args)
    base.validate()
    check_model_source(base.model, base.model_config)
    clips = [Path(c) for c in args.clips]
    for folder in clips:
        if not folder.is_dir():
            raise TokenFlowError(f"--clips {folder}: no such folder")
    if not is_local(args.host):
        print(
            f"warning: serving on {args.host}: anyone who can reach it and has the login can run"
            " jobs on this machine",
            file=sys.stderr,
        )
    from ..ui.app import UIConfig, build_app, launch
    from ..ui.runner import JobRunner

    workdir = Path(tempfile.mkdtemp(prefix="tokenflow-ui-"))
    config = UIConfig(Path(args.outputs), workdir, base, clips, max_upload)
    config.prepare()
    runner = JobRunner()
    print(f"loading {base.model} ...", file=sys.stderr)
    runner.models.get(base)
    demo = build_app(config, runner)
    try:
        url = launch(demo, config, args.host, args.port, auth)
    except OSError as exc:
        raise TokenFlowError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    print(f"tokenflow ui: {url}  (outputs in {config.outputs}; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        demo.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0

"""``tokenflow cache list|size|clear``: look at and tidy the inversion cache."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from ..cache import ENV_VAR, InversionCache, _platform_cache_dir
from ..errors import TokenFlowError

_MIB = 1024 * 1024


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``tokenflow cache {list,size,clear [KEY | --all]}`` and ``--cache-dir``."""
    cache_dir_help = f"cache folder (default: ${ENV_VAR}, else {_platform_cache_dir()})"
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help=cache_dir_help)
    sub = parser.add_subparsers(dest="cache_command", metavar="{list,size,clear}")
    commands = {
        "list": "list cached inversions, newest first (the default)",
        "size": "print the total size of the cache",
        "clear": "remove the entry whose key starts with KEY, or every entry (--all)",
    }
    for name, help_text in commands.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS so that `cache list` without it keeps a --cache-dir given before `list`.
        cmd.add_argument(
            "--cache-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR", help=cache_dir_help
        )
        if name == "clear":
            cmd.add_argument(
                "cache_key",
                nargs="?",
                default=None,
                metavar="KEY",
                help="a key or key prefix from `tokenflow cache list`",
            )
            cmd.add_argument("--all", action="store_true", help="remove every entry without asking")


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB"


def _describe(meta: dict) -> str:
    """frames/size/model/prompt from an entry's meta, whichever are present."""
    parts = []
    if "frames" in meta:
        parts.append(f"{meta['frames']} frames")
    size = meta.get("size")
    if isinstance(size, list | tuple) and len(size) == 2:
        parts.append(f"{size[0]}x{size[1]}")
    elif size is not None:
        parts.append(str(size))
    if meta.get("model"):
        parts.append(str(meta["model"]))
    if "prompt" in meta:
        prompt = str(meta["prompt"])
        parts.append(json.dumps(prompt if len(prompt) <= 40 else prompt[:39] + "…"))
    if meta.get("source"):
        parts.append(str(meta["source"]))
    return "  ".join(parts) if parts else "(no details)"


def _confirm_clear_all(cache: InversionCache, all_flag: bool) -> bool:
    """Clearing everything needs ``--all`` or a "y" at a terminal."""
    if all_flag:
        return True
    entries = cache.entries()
    if not entries:
        return True
    if not sys.stdin.isatty():
        raise TokenFlowError(
            "`tokenflow cache clear` without a KEY removes every cached inversion; pass --all"
            " to confirm, or give the KEY of one entry"
        )
    total = sum(e.size_bytes for e in entries)
    answer = input(f"remove all {len(entries)} entries ({_mib(total)}) from {cache.root}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def run_cache(args: argparse.Namespace) -> int:
    """Run ``tokenflow cache`` from parsed arguments; prints the result, returns the exit code."""
    cache = InversionCache(getattr(args, "cache_dir", None))
    if cache.root.exists() and not cache.root.is_dir():
        raise TokenFlowError(f"cache folder {cache.root} is a file; pass a folder to --cache-dir")
    command = getattr(args, "cache_command", None) or "list"
    entries = cache.entries()
    total = sum(e.size_bytes for e in entries)
    noun = "entry" if len(entries) == 1 else "entries"
    if command == "list":
        if not entries:
            print(f"no cached inversions in {cache.root}")
            return 0
        for e in entries:
            created = datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M")
            print(f"{e.key[:12]}  {_mib(e.size_bytes):>10}  {created}  {_describe(e.meta)}")
        print(f"{len(entries)} {noun}, {_mib(total)} in {cache.root}")
    elif command == "size":
        print(f"{_mib(total)} in {len(entries)} {noun} ({cache.root})")
    else:  # clear
        key = args.cache_key
        if key is None and not _confirm_clear_all(cache, args.all):
            print("nothing removed")
            return 1
        removed = cache.clear(key)
        freed = max(total - cache.size(), 0)
        noun = "entry" if removed == 1 else "entries"
        if key is not None and removed == 0:
            print(f"removed 0 entries: no cache entry matches {key!r} in {cache.root}")
        else:
            print(f"removed {removed} {noun} ({_mib(freed)}) from {cache.root}")
    return 0

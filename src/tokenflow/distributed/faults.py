"""When one rank of an edit fails, every rank stops in bounded time and one line says why.

A rank that raises posts what happened to the group's key-value store (the one torchrun or
``init_process_group`` set up, which outlives any worker) and leaves; its peers, blocked in a
transfer with it, see the transfer fail (at once when its process is gone, else after the
group's timeout) and post that they lost contact. A rank stopped by a signal posts that. The
rank that speaks -- rank 0, or the lowest that is still there -- waits a few seconds for
everyone's word and names the cause: the rank that failed and its error, or the rank that
never answered (killed, out of memory, hung, its machine gone). Every other rank stays
silent, so a failure of one rank is one ``error:`` line, not one traceback per rank.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator

from ..errors import TokenFlowError, first_line
from ..progress import Cancelled
from .comm import Communicator, PeerLost

#: how long the speaking rank waits for every rank's word before naming the silent ones
GRACE_S = 3.0
_EDITS = itertools.count()  # keys of one edit never meet another's (ranks run edits alike)


class RankFailure(TokenFlowError):
    """An edit over several ranks stopped because of one of them; the message says which and
    what. ``speaker``: whether this rank is the one that reports it (the others stay silent)."""

    exit_code = 1

    def __init__(self, message: str, speaker: bool) -> None:
        super().__init__(message)
        self.speaker = speaker


def describe(error: BaseException) -> str:
    """One line for an error: a TokenFlowError's message (its options still marked), else the
    exception's type and first line."""
    if isinstance(error, TokenFlowError):
        return str(error.args[0]) if error.args else type(error).__name__
    text = first_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _store():
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # no store to share words through
        return None


class Statuses:
    """Each rank's last word about one edit, in the group's store."""

    def __init__(self, comm: Communicator) -> None:
        self.rank, self.world = comm.rank, comm.world
        self.prefix = f"tokenflow/edit-{next(_EDITS)}/status/"
        self.store = _store()
        self.posted = False
        self._lock = threading.Lock()

    def post(self, kind: str, text: str) -> None:
        """This rank's word: ``failed`` (its own error), ``lost`` (a transfer failed) or
        ``stopped`` (a signal); the first one posted stands."""
        with self._lock:
            if self.posted or self.store is None:
                return
            self.posted = True
        with contextlib.suppress(Exception):  # the store may be gone with its host
            self.store.set(self.prefix + str(self.rank), json.dumps([kind, text]))

    def collect(self, grace: float) -> dict[int, tuple[str, str]]:
        """Every rank's word, waiting up to ``grace`` seconds for the missing ones."""
        words: dict[int, tuple[str, str]] = {}
        deadline = time.monotonic() + grace
        while self.store is not None:
            for rank in range(self.world):
                key = self.prefix + str(rank)
                if rank not in words:
                    with contextlib.suppress(Exception):
                        if self.store.check([key]):
                            kind, text = json.loads(self.store.get(key))
                            words[rank] = (kind, text)
            if len(words) == self.world or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return words

    def verdict(self) -> tuple[str | None, bool]:
        """(what stopped the edit, or None when every rank was stopped alike by a signal;
        whether this rank is the one to say it), from the words posted within ``GRACE_S``."""
        words = self.collect(GRACE_S)
        speaker = self.rank == min({*words, self.rank})
        failed = [
            r for r, (kind, _) in sorted(words.items()) if kind == "failed" and r != self.rank
        ]
        silent = [r for r in range(self.world) if r not in words and r != self.rank]
        if failed:
            cause = f"rank {failed[0]} of {self.world} failed: {words[failed[0]][1]}"
        elif silent:
            which = ", ".join(map(str, silent))
            cause = (
                f"rank{'s' if len(silent) > 1 else ''} {which} of {self.world} stopped responding"
                " (killed, out of memory, hung, or its machine went away)"
            )
        elif any(kind == "lost" for kind, _ in words.values()):
            cause = next(text for kind, text in words.values() if kind == "lost")
        else:
            return None, speaker
        return f"{cause}; every rank stopped, no output written", speaker


#: the statuses of the edit running (or last run) in this process, for the CLI's signal path
_current: Statuses | None = None


@contextlib.contextmanager
def failure_guard(comm: Communicator | None) -> Iterator[None]:
    """Around an edit over ranks: post this rank's word when it fails, and turn a failed
    transfer into a ``RankFailure`` naming the rank at fault. Nested guards share one edit's
    statuses. Without a communicator it does nothing.

    An edit that ends cleanly destroys the sub-groups it made through ``comm``, on every rank
    alike, so that edits run one after another in a process do not pile them up. A failed one
    leaves them: they are broken with the world, which takes them down with it, and taking one
    down alone could wait on a dead peer."""
    global _current
    if comm is None:
        yield
        return
    outer = _current is None or _current.posted
    statuses = Statuses(comm) if outer else _current
    _current = statuses
    try:
        yield
    except RankFailure:
        raise
    except PeerLost as error:
        statuses.post("lost", describe(error))
        raise RankFailure(*statuses.verdict()) from error
    except (KeyboardInterrupt, Cancelled) as error:
        statuses.post("stopped", describe(error))
        raise
    except BaseException as error:
        statuses.post("failed", describe(error))
        raise
    else:
        comm.release_groups()
    finally:
        if outer and not statuses.posted:
            _current = None  # finished cleanly: the next edit gets fresh keys


def stopped_by_signal(how: str) -> tuple[str | None, bool] | None:
    """For a front end stopped by Ctrl-C or SIGTERM while an edit ran over ranks: post it,
    then (what stopped the edit, or None when every rank was stopped alike; whether this rank
    says it). None when no edit over ranks was running. Further signals are ignored while it
    waits for the other ranks' word."""
    statuses = _current
    if statuses is None:
        return None
    statuses.post("stopped", how)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        return statuses.verdict()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

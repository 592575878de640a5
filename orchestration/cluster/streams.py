"""A rank whose stdout or stderr goes away keeps training and saving.

The reader of a rank's output can die before the rank: ``launch/local.sh ... | tee log`` when
Ctrl-C reaches ``tee`` too, a closed terminal, a log collector that exits. The rank's next
``print`` then raises ``BrokenPipeError`` (EPIPE; Python ignores SIGPIPE) or ``OSError`` (EIO
on a hung-up terminal), possibly in the middle of the stop checkpoint that the same Ctrl-C or
SIGHUP asked for; and at exit Python reports the failed flush with exit status 120. Here each
standard stream is wrapped so that the first failed write points its file descriptor at
``/dev/null`` (C++ writers such as gloo's share it) and the process carries on: the output
is lost, which it would have been anyway; the checkpoint and the exit status are not.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TextIO


class GuardedStream(io.TextIOBase):
    """A text stream that turns a failed write or flush into silence, once and for all."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken: OSError | None = None

    def write(self, text: str) -> int:
        if self.broken is None:
            try:
                return self.stream.write(text)
            except OSError as err:
                self._divert(err)
        return len(text)

    def flush(self) -> None:
        if self.broken is None:
            try:
                self.stream.flush()
            except OSError as err:
                self._divert(err)

    def _divert(self, err: OSError) -> None:
        self.broken = err
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()  # what was buffered goes to /dev/null now

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.broken is None and self.stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def guard_standard_streams() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (before logging captures them); idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))

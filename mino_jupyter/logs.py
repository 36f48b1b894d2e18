"""A session's output on the host: the log that outlives its container, and the fan-out of a
cell's output to the display and the log, secrets masked in both."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from .cell import CellResult, Sink
from .redact import Redactor, mask
from .runtime import STDERR, STDOUT

LOG_CELL_LIMIT = 64 << 20  # bytes of output kept in the log per cell (the display shows far less)


class SessionLog:
    """A session's output on the host, secrets masked; it outlives the container."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None  # open while a cell writes output (one open per cell, not per piece)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            for directory in (path.parent.parent, path.parent):  # output can be sensitive: owner only
                os.chmod(directory, 0o700)

    def cell_start(self, number: int, script: str, secrets: list[str]) -> None:
        stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        body = "".join(f"$ {line}\n" for line in mask(script, secrets).splitlines())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"=== cell {number} at {stamp}\n{body}--- output\n")

    def write(self, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(text)

    def flush(self) -> None:
        """What the cell printed so far is in the file (`%mino logs` of a running cell)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def cell_end(self, result: CellResult, dropped: int) -> None:
        self.close()
        note = f"[{dropped} bytes of output not logged]\n" if dropped else ""
        if result.timed_out:
            status = f"timed out after {result.timeout:g} s (exit 124)"
        elif result.interrupted:
            status = f"{result.interrupted} (exit {result.exit_code})"
        else:
            status = f"exit {result.exit_code}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{note}=== {status} after {result.duration:.2f} s\n")

    def tail(self, lines: int | None) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        if lines is None:
            return text
        return "\n".join(text.splitlines()[-lines:]) + ("\n" if text else "")


class CellSink:
    """Fans a cell's output out to the display (masked) and the log (masked, capped)."""

    def __init__(self, sink: Sink, log: SessionLog, secrets: list[str]):
        self.sink = sink
        self.log = log
        self.redactors = {STDOUT: Redactor(secrets), STDERR: Redactor(secrets)}
        self.logged = 0
        self.dropped = 0

    def write(self, stream: int, text: str) -> None:
        text = self.redactors[stream].feed(text)
        if text:
            self._out(stream, text)

    def _out(self, stream: int, text: str) -> None:
        self.sink.write(stream, text)
        size = len(text.encode("utf-8", "replace"))
        if self.logged + size <= LOG_CELL_LIMIT:
            self.log.write(text)
            self.logged += size
        else:
            self.dropped += size

    def flush(self) -> None:
        self.sink.flush()
        self.log.flush()

    def flush_soon(self) -> None:
        """Ask for the display's send without waiting for it (see :func:`mino_jupyter.cell._follow`)."""
        getattr(self.sink, "flush_soon", self.sink.flush)()
        self.log.flush()

    def close(self) -> None:
        for stream, redactor in self.redactors.items():
            rest = redactor.flush()
            if rest:
                self._out(stream, rest)
        self.sink.flush()
        self.log.flush()

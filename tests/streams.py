"""A child process's output read line by line in a thread, so that a test waits for a line with a
deadline that fires even when the process goes silent (a ``for line in proc.stderr`` loop checks
its deadline only when a line arrives), and the pipe never fills while the test does other work."""

from __future__ import annotations

import subprocess
import threading
from typing import IO, Callable


class Lines:
    """Every line of ``stream`` (e.g. ``proc.stderr`` of a text-mode Popen), read from now on."""

    def __init__(self, stream: IO[str]):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float, what: str = "the line") -> str:
        """The first line ``match`` accepts; AssertionError when ``timeout`` seconds pass first or
        the stream ends without one."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(match(ln) for ln in self.lines) or self._done, timeout=timeout)
            hit = next((ln for ln in self.lines if match(ln)), None)
        if hit is None:
            tail = "".join(self.lines[-20:])
            raise AssertionError(f"{what} did not come within {timeout:.0f} s"
                                 f"{'' if found else ' (the deadline fired)'}; last lines:\n{tail}")
        return hit

    def text(self, proc: subprocess.Popen | None = None, timeout: float = 60) -> str:
        """All the lines once the stream has ended (``proc`` waited for first, up to ``timeout``)."""
        if proc is not None:
            proc.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        return "".join(self.lines)

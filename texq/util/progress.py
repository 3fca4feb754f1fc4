"""Progress of long loops: a tqdm bar on a terminal, else log lines (what a Prefect UI or a log
file shows): ``texq`` logger records at every tenth of the work, with the bar's postfix."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger("texq")


class LoggedProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as log lines, one per ``every`` steps."""

    def __init__(self, total: int, desc: str, initial: int = 0, parts: int = 10):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.every = max(1, -(-self.total // parts))
        self.postfix = ""
        self._logged = self.n // self.every

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n // self.every > self._logged or self.n == self.total:
            self._logged = self.n // self.every
            self._emit()

    def set_postfix(self, values=None, **kw) -> None:
        items = {**(values or {}), **kw}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def _emit(self) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        log.info("%s: %d/%d (%.0f%%) %s", self.desc, self.n, self.total, pct, self.postfix)
        if self.n >= self.total:
            self._logged = float("inf")  # the last line once

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar when ``enabled`` (interactive), else a ``LoggedProgress``."""
    if enabled:
        return tqdm(total=total, initial=initial, desc=desc)
    return LoggedProgress(total, desc, initial)

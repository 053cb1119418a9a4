"""gpubox's one progress renderer: a download's bytes (the models step, on the target and on the controller)
and a build's edges (Ninja's [n/N]), said sparingly.

Styles: "bar" redraws one line (\\r) on a terminal; "lines" writes a line when `every_pct` percent more is
done or `every_s` seconds have passed, and always the last; "machine" writes `@@progress {json}` lines that
the controller renders again (fetch.py on the target -> the models step). Standard library only: it also
runs on the target (provision/remote.py sends it with fetch.py).

>>> out = []
>>> p = Progress("[build]", unit="edges", echo=out.append, every_pct=50, every_s=1e9, clock=lambda: 0.0)
>>> for i in (1, 2, 3, 4): p.update(i, 4)
>>> out
['[build] 1/4 (25%) 0m00s', '[build] 2/4 (50%) 0m00s', '[build] 4/4 (100%) 0m00s']
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def mmss(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


class Progress:
    """update(done, total) as work advances; it decides what to say and when (see the module docstring)."""

    def __init__(self, label: str, *, total: int | None = None, unit: str = "bytes", style: str = "lines", initial: int = 0,
                 every_pct: float | None = None, every_s: float = 10.0, out=None,
                 echo: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.style = label, unit, style
        self.initial, self.every_pct, self.every_s = initial, every_pct, every_s
        self.out = out or (sys.stderr if style == "bar" else sys.stdout)
        self.echo, self.clock = echo, clock
        self.t0 = self.last_t = clock()
        self.last_pct = -1.0
        self.done, self.total, self.finished = initial, total, False

    def update(self, done: int, total: int | None = None, *, rate: float | None = None, left: float | None = None,
               final: bool = False) -> None:
        """`rate`/`left` when the caller knows them (the target's own figures), else from the elapsed time."""
        self.done = done
        self.total = total if total is not None else self.total
        final = final or bool(self.total and done >= self.total)
        if self.finished:
            return
        now = self.clock()
        pct = 100.0 * done / self.total if self.total else 0.0
        first = self.last_pct < 0
        step = self.every_pct is not None and pct // self.every_pct > self.last_pct // self.every_pct
        if not (first or final or step or now - self.last_t >= self.every_s):
            return
        self.last_t, self.last_pct, self.finished = now, pct, final
        if rate is None:
            dt = now - self.t0
            rate = (done - self.initial) / dt if dt > 0 else 0.0
        if left is None and rate and self.total:
            left = (self.total - done) / rate
        self._say(self._text(done, pct, rate, left, now), final)

    def _text(self, done: int, pct: float, rate: float, left: float | None, now: float) -> str:
        total = self.total or 0
        if self.style == "machine":
            return "@@progress " + json.dumps({"file": self.label, "done": done, "total": self.total,
                                               "rate": round(rate or 0), "eta": left})
        if self.unit == "edges":
            return f"{self.label} {done}/{total} ({int(pct)}%) {mmss(now - self.t0)}"
        if self.style == "bar":
            n = int(pct / 100 * 24)
            return (f"{self.label[:40]:<40} [{'#' * n}{'.' * (24 - n)}] {human(done)}/{human(total)} "
                    f"{human(rate or 0)}/s ETA {eta(left)}")
        return (f"{self.label}: {pct:5.1f}% {human(done)} of {human(total)}, {human(rate or 0)}/s, "
                f"ETA {eta(left)}")

    def _say(self, text: str, final: bool) -> None:
        if self.echo is not None:
            self.echo(text)
            return
        if self.style == "bar":
            self.out.write("\r" + text + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

"""Job events → a tqdm-style progress bar on stderr and the user's callback.

The Rust job sends each event as JSON text: ``message``, ``warning``, ``start`` (``total``,
``done``), ``step`` (``step``, ``total``, ``loss``, ``lr``, ``examples_per_s``, ``eta_s``),
``eval`` (``step``, ``metric``, ``score``, ``loss``, ``best``) and ``finish``. The callback
receives the ``step`` and ``eval`` events as dicts; an exception it raises stops the job (after
the checkpoint) and propagates.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional

Callback = Callable[[Dict[str, Any]], Any]


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _num(x: Any, spec: str = ".4f") -> str:
    """A number for display; non-finite values arrive as None (JSON null)."""
    return "nan" if x is None else format(x, spec)


class Reporter:
    """Renders events; pass the instance to the native job as ``on_event``."""

    def __init__(self, verbose: bool = True, callback: Optional[Callback] = None, desc: str = "train", stream: Any = None) -> None:
        self.verbose = verbose
        self.callback = callback
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.total = 0
        self.start_time = 0.0
        self.done0 = 0
        self.last: Dict[str, Any] = {}
        self.open = False
        self.events = 0

    def __call__(self, text: str) -> None:
        ev = json.loads(text)
        self.events += 1
        kind = ev.get("event")
        if kind == "message":
            self._line(ev["text"])
        elif kind == "warning":
            warnings.warn(ev["text"], stacklevel=2)
        elif kind == "start":
            self.total = int(ev.get("total") or 0)
            self.done0 = int(ev.get("done") or 0)
            self.start_time = time.monotonic()
            self.desc = ev.get("what") or self.desc
            self._bar(self.done0, {})
        elif kind == "step":
            self.total = int(ev.get("total") or self.total)
            self._bar(int(ev["step"]), ev)
            if self.callback is not None:
                self.callback(ev)
        elif kind == "eval":
            mark = " (best)" if ev.get("best") else ""
            self._line(f"step {ev['step']}: dev {ev['metric']} {_num(ev.get('score'))}, loss {_num(ev.get('loss'))}{mark}")
            if self.callback is not None:
                self.callback(ev)
        elif kind == "finish":
            if self.open and self.verbose:
                self.stream.write("\n")
                self.stream.flush()
            self.open = False

    def _line(self, text: str) -> None:
        if not self.verbose:
            return
        if self.open:
            self.stream.write("\n")
            self.open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def _bar(self, n: int, ev: Dict[str, Any]) -> None:
        if not self.verbose:
            return
        total = max(self.total, 1)
        frac = min(1.0, n / total)
        width = 24
        filled = int(frac * width)
        bar = "█" * filled + " " * (width - filled)
        elapsed = time.monotonic() - self.start_time if self.start_time else 0.0
        post = ""
        if "loss" in ev:
            post = f", loss={_num(ev.get('loss'))}, lr={_num(ev.get('lr'), '.2e')}, {_num(ev.get('examples_per_s'), '.1f')} ex/s"
        eta = ev.get("eta_s", 0.0) or 0.0
        self.stream.write(f"\r{self.desc}: {frac * 100:3.0f}%|{bar}| {n}/{self.total} [{_fmt_time(elapsed)}<{_fmt_time(eta)}{post}]")
        self.stream.flush()
        self.open = True

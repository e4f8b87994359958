"""Progress on the terminal for steps that take more than a second.

On a terminal, a step that is still running after a second gets a status line on stderr
(rewritten in place, erased when the step ends). Elsewhere nothing is shown, unless verbose,
where each step's start and end are printed as plain lines.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO

SHOW_AFTER = 1.0


class Progress:
    def __init__(self, stream: TextIO = None, verbose: bool = False, interactive: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.verbose = verbose
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.step: Optional[str] = None
        self.started = 0.0
        self.done: Optional[int] = None
        self.total: Optional[int] = None
        self._shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.interactive:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def __call__(self, step: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
        with self._lock:
            if step != self.step:
                self._end_step()
                self.step, self.started = step, time.perf_counter()
                if self.verbose and not self.interactive:
                    self.stream.write(f"  ... {step}\n")
                    self.stream.flush()
            self.done, self.total = done, total
            self._draw()

    def _draw(self) -> None:
        if not self.interactive or self.step is None:
            return
        elapsed = time.perf_counter() - self.started
        if elapsed < SHOW_AFTER:
            return
        count = f" {self.done}/{self.total}" if self.done is not None and self.total else ""
        self.stream.write(f"\r\033[K  {self.step}{count}  {elapsed:.1f}s")
        self.stream.flush()
        self._shown = True

    def _end_step(self) -> None:
        if self.step is None:
            return
        elapsed = time.perf_counter() - self.started
        if self._shown:
            self.stream.write("\r\033[K")
            self._shown = False
        if self.verbose and not self.interactive:
            self.stream.write(f"      {self.step} done in {elapsed:.2f}s\n")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                self._draw()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._end_step()
            self.step = None

"""Progress over (case, provider) steps on stderr: a tqdm bar on a terminal,
else one timestamped line per step, which reads well in CI and suite logs."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total):
        self._total, self._done, self._start = total, 0, time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, label):
        """Announce the step about to run."""
        if self._bar is not None:
            if self._done:
                self._bar.update(1)
            self._bar.set_description_str(label)
        else:
            elapsed = time.monotonic() - self._start
            print(f"[{self._done + 1}/{self._total} {elapsed:6.0f}s] {label}", file=sys.stderr, flush=True)
        self._done += 1

    def note(self, message):
        """A line that must stay visible (why a provider was skipped or failed)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(f"  {message}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            if self._done:
                self._bar.update(1)
            self._bar.close()

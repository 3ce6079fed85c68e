"""Progress lines of long jobs on stderr (sampling, evaluation, reference statistics, prepare,
bench), e.g.

  eval: 250/50000 images (0.5%), first batch 41.2 s (compilation included)
  eval: 12750/50000 images (25.5%), 1250.0 images/s, ETA 30 s
  eval: 50000/50000 images in 81 s (1250.0 images/s after the first batch)

Printed at most every `every_s` seconds and always at the end. The rate, hence the ETA, is
measured from the first update on: the first batch of a job pays for compilation, so it is left
out (`Rate`). stdout stays free for a job's result (bench's JSON line).
"""

import sys
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: float) -> str:
  """'42 s', '12.5 min' or '3.2 h'."""
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class Rate:
  """Units per second measured over updates after the first one (which includes compilation).

  `update(done, now)` records `done` units finished by time `now`; `per_second()` is None until a
  second update has been seen; `eta(total)` the seconds left at that rate (None likewise).
  """

  def __init__(self):
    self.first: Optional[tuple] = None  # (done, time) at the first update
    self.last: Optional[tuple] = None

  def update(self, done: float, now: float) -> None:
    if self.first is None:
      self.first = (done, now)
    self.last = (done, now)

  def per_second(self) -> Optional[float]:
    if self.first is None or self.last[0] <= self.first[0] or self.last[1] <= self.first[1]:
      return None
    return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])

  def eta(self, total: float) -> Optional[float]:
    rate = self.per_second()
    return None if rate is None else max(total - self.last[0], 0) / rate


class Progress:
  """A `progress(done, total)` callback printing '<label>: done/total <unit> ...' lines.

  label: the job ('sample', 'eval', ...); total: units expected (a callback's own `total`
  argument overrides it); every_s: least seconds between lines (the first and last always print);
  stream: default sys.stderr; clock: seconds (injectable for tests).
  """

  def __init__(self, label: str, total: int = 0, unit: str = "images", every_s: float = 10.0,
               stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
    self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
    self.stream, self.clock = stream, clock
    self.start = clock()
    self.rate = Rate()
    self.done = 0
    self.printed_at: Optional[float] = None

  def line(self, done: int, now: float) -> str:
    """The progress line for `done` units at time `now` (after `update`)."""
    head = f"{self.label}: {done}/{self.total} {self.unit}"
    if self.total:
      head += f" ({100 * done / self.total:.1f}%)"
    rate = self.rate.per_second()
    if done >= self.total:
      tail = "" if rate is None else f" ({rate:.1f} {self.unit}/s after the first batch)"
      return f"{head} in {format_duration(now - self.start)}{tail}"
    if rate is None:
      return f"{head}, first batch {now - self.start:.1f} s (compilation included)"
    return (f"{head}, {rate:.1f} {self.unit}/s, ETA "
            f"{format_duration(self.rate.eta(self.total))}")

  def __call__(self, done: int, total: Optional[int] = None) -> Optional[str]:
    """Records `done` units; prints (and returns) a line when one is due, else returns None."""
    if total is not None:
      self.total = total
    self.done = done
    now = self.clock()
    self.rate.update(done, now)
    due = (self.printed_at is None or done >= self.total
           or now - self.printed_at >= self.every_s)
    if not due:
      return None
    self.printed_at = now
    text = self.line(done, now)
    print(text, file=self.stream or sys.stderr, flush=True)
    return text

  def advance(self, count: int = 1) -> Optional[str]:
    """`self(done + count)`: for jobs that count their own units."""
    return self(self.done + count)

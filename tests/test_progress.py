"""progress.Progress: lines, rate and ETA math (the first batch, which compiles, is left out)."""

import io

from uni_instruct_jax import progress


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def make(total=1000, every_s=10.0):
  clock, stream = Clock(), io.StringIO()
  return progress.Progress("eval", total, every_s=every_s, stream=stream, clock=clock), clock, stream


def test_rate_and_eta_leave_out_the_first_batch():
  report, clock, stream = make()
  clock.now = 30.0   # the first batch of 100 took 30 s: compilation
  first = report(100)
  assert first == "eval: 100/1000 images (10.0%), first batch 30.0 s (compilation included)"
  clock.now = 40.0   # 200 more in 10 s: 20 images/s, 700 left -> 35 s
  line = report(300)
  assert report.rate.per_second() == 20.0 and report.rate.eta(1000) == 35.0
  assert line == "eval: 300/1000 images (30.0%), 20.0 images/s, ETA 35 s"
  assert stream.getvalue().splitlines() == [first, line]


def test_lines_are_rate_limited_but_the_last_always_prints():
  report, clock, stream = make(total=400)
  for done in (100, 200, 300):
    clock.now += 3.0
    report(done)
  assert len(stream.getvalue().splitlines()) == 1   # only the first: < 10 s since
  clock.now += 3.0
  last = report(400)
  # 300 images in the 9 s after the first batch.
  assert last == "eval: 400/400 images (100.0%) in 12 s (33.3 images/s after the first batch)"
  assert stream.getvalue().splitlines()[-1] == last


def test_callback_total_and_advance():
  report, clock, _ = make(total=0)
  clock.now = 1.0
  report(5, 50)   # image_folder / prepare call progress(done, total)
  assert report.total == 50
  clock.now = 100.0
  assert report.advance(10) == "eval: 15/50 images (30.0%), 0.1 images/s, ETA 5.8 min"


def test_format_duration():
  assert [progress.format_duration(s) for s in (42, 750, 4 * 3600)] == ["42 s", "12.5 min",
                                                                        "4.0 h"]

"""Progress off a terminal: whole lines, at most one per 10 % or per 10 s, one at the end."""

import io

from any2seg.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_steady_work_prints_one_line_per_tenth_and_a_final_line():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=700, desc="training", unit="step", stream=out, clock=clock)
    for _ in range(700):  # 0.1 s per step: 7 s per tenth
        clock.t += 0.1
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # 10 %, 20 %, ..., 90 % and the final 700/700
    assert lines[0].startswith("training: 70/700 step (10%)")
    assert lines[-1].startswith("training: 700/700 step (100%)")


def test_work_done_within_a_second_prints_only_its_final_line():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, desc="hashing", unit="file", stream=out, clock=clock)
    for _ in range(1000):  # 0.4 s in all
        clock.t += 0.0004
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == ["hashing: 1000/1000 file (100%) in 0 s"]


def test_slow_work_prints_a_heartbeat_every_ten_seconds():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=10_000, desc="caching", unit="sample", stream=out, clock=clock)
    for _ in range(60):  # 60 s, 0.6 % of the work
        clock.t += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 7  # at 10, 20, ..., 60 s and the final line
    assert "60/10000" in lines[-1] and "1.00 sample/s" in lines[-1]


def test_iteration_postfix_resume_and_unknown_total():
    out = io.StringIO()
    items = list(progress(range(5), desc="evaluating", unit="batch", stream=out))
    assert items == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("evaluating: 5/5 batch (100%)")
    out = io.StringIO()
    bar = LineProgress(total=100, initial=90, desc="training", stream=out, clock=Clock())
    bar.set_postfix(loss="0.500")
    bar.update(10)
    bar.close()
    assert out.getvalue() == "training: 100/100 it (100%) in 0 s loss=0.500\n"
    out = io.StringIO()
    with LineProgress(desc="reading", stream=out, clock=Clock()) as bar:
        bar.update(3)
    assert out.getvalue() == "reading: 3 it in 0 s\n"


def test_terminal_gets_tqdm_and_disabled_bars_print_nothing():
    tty = FakeTTY()
    bar = progress(total=3, desc="x", stream=tty)
    from tqdm import tqdm

    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()  # redrawn in place
    quiet = io.StringIO()
    assert list(progress(range(3), enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_heartbeat_prints_while_one_item_takes_long(monkeypatch):
    """A validation frame at 1024 px can take minutes: the log still gets a line every
    LINE_EVERY_S, with the ETA, although no update arrives."""
    import time

    from any2seg import progress as progress_module

    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.05)
    out = io.StringIO()
    bar = LineProgress(total=4, desc="evaluating", unit="batch", stream=out, heartbeat=True,
                       start=time.monotonic() - 2.0)
    bar.update(1)
    time.sleep(0.4)  # one long item: no update
    lines = out.getvalue().splitlines()
    bar.close()
    assert len(lines) >= 2, lines
    assert all(line.startswith("evaluating: 1/4 batch (25%) in ") for line in lines)
    assert "ETA 6 s" in lines[0]  # 1 of 4 in 2 s: 3 more take 6 s
    final = out.getvalue().splitlines()[-1]
    assert final.startswith("evaluating: 1/4 batch (25%) in 2 s")  # counted from `start`
    time.sleep(0.2)
    assert out.getvalue().splitlines()[-1] == final  # closed: the thread has stopped


def test_reporting_makes_the_bar_at_the_first_report_and_closes_it(capsys):
    """The callback the commands hand to work that counts itself (make-sample, pack,
    cache-teacher): no report, no bar; reports move one bar to `done` of `total`."""
    from any2seg.progress import reporting

    with reporting("nothing", "file"):
        pass
    assert capsys.readouterr().err == ""
    with reporting("packing x", "file") as report:
        report(3, 4)
        report(4, 4)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("packing x") for line in lines)
    assert "4/4" in lines[-1]

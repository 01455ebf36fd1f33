"""The console progress displays: a rich live display on a terminal, plain lines otherwise (byte for byte as
before), and a terminal left clean by `clear()`. No training: the callbacks are fed records by hand, on a fake
terminal and a fake clock."""

from __future__ import annotations

import io
import re
import sys

import pytest

from autoshard import cli
from autoshard.commands import train

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HIDE, SHOW, UP = "\x1b[?25l", "\x1b[?25h", "\x1b[1A"


class Tty(io.StringIO):
    """A terminal as far as `isatty` (and so rich) can tell."""

    def isatty(self) -> bool:
        return True


class Clock:
    """Stands in for the `time` module of the code under test: seconds move only when the test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def terminal(monkeypatch) -> Tty:
    """A wide colour terminal, whatever the environment the tests run in says."""
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    return Tty()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(train, "time", c)
    return c


def record(step: int, **extra) -> dict:
    return {"step": step, "loss": 3.0 / step, "tokens_per_s": 100.0, "step_time_s": 30.0, "mfu": 0.123,
            "predicted_step_s": 25.0, **extra}


def feed(progress: train.Progress, clock: Clock, steps: range) -> None:
    """Steps 30 s apart on the fake clock: 100 tokens/s (3,000 a step) and an estimate of 30 s a step to go."""
    for step in steps:
        clock.t = 30.0 * (step - progress.start)
        progress(record(step, **({"dropped_tokens": 37.0} if step == 3 else {})))


def plain(text: str) -> str:
    return ANSI.sub("", text)


def cursor_shown(text: str) -> bool:
    return text.rfind(SHOW) > text.rfind(HIDE) >= 0


@pytest.mark.smoke
def test_training_bar_on_a_terminal(terminal, clock, capsys):
    stderr = sys.stderr
    progress = train.Progress(total=10, log_every=5, stream=terminal)
    try:
        feed(progress, clock, range(1, 4))
        assert progress.shown and progress.tty
    finally:
        progress.clear()
    shown = plain(terminal.getvalue())
    assert ("step 3/10 " in shown and "loss 1.0000  100 tok/s  30.0s/step (predicted 25.0s)  MFU 12.3%  "
            "37 tokens dropped  1m30s elapsed, 3m30s left" in shown)
    assert "━" in shown  # the bar
    assert capsys.readouterr().out == "step 1 loss 3.000000\n"  # stdout: the plain lines, untouched
    assert not progress.shown and cursor_shown(terminal.getvalue()) and sys.stderr is stderr
    assert terminal.getvalue().endswith(UP + "\x1b[2K")  # cleared: the bar's line erased


def test_stdout_lines_go_between_bars_and_the_last_bar_stays(terminal, clock, capsys):
    progress = train.Progress(total=6, log_every=3, start=2, stream=terminal)
    try:
        feed(progress, clock, range(3, 7))
    finally:
        progress.clear()
    assert capsys.readouterr().out == "step 3 loss 1.000000\nstep 6 loss 0.500000\n"
    text = terminal.getvalue()
    assert text.count(HIDE) == text.count(SHOW) == 2  # a display before each stdout line, stopped for it
    last = text[text.rfind(HIDE):]
    assert "step 6/6" in plain(last) and "2m00s elapsed" in plain(last) and "left" not in plain(last)
    assert last.endswith("\n" + SHOW) and UP not in last  # the final bar is kept, not erased
    assert not progress.shown


def test_stderr_written_during_the_bar_goes_above_it(terminal, clock, capsys):
    progress = train.Progress(total=10, log_every=5, stream=terminal)
    try:
        feed(progress, clock, range(1, 3))
        print("SIGTERM received: stopping after this step", file=sys.stderr)
    finally:
        progress.clear()
    shown = plain(terminal.getvalue())
    assert "SIGTERM received: stopping after this step\n" in shown
    assert shown.index("SIGTERM received") < shown.rindex("step 2/10")  # the bar drawn again below it
    assert capsys.readouterr().err == ""


def test_training_lines_stay_plain_off_a_terminal(clock, capsys):
    stream = io.StringIO()
    progress = train.Progress(total=4, log_every=2, stream=stream, every_s=0.0)
    feed(progress, clock, range(1, 5))
    progress.clear()
    assert progress.console is None and not progress.shown
    assert capsys.readouterr().out == ("step 1 loss 3.000000\nstep 2 loss 1.500000\nstep 4 loss 0.750000\n")
    assert stream.getvalue() == (
        "step 1/4  loss 3.0000  100 tok/s  30.0s/step (predicted 25.0s)  MFU 12.3%  30s elapsed\n"
        "step 2/4  loss 1.5000  100 tok/s  30.0s/step (predicted 25.0s)  MFU 12.3%  1m00s elapsed, 1m00s left\n"
        "step 3/4  loss 1.0000  100 tok/s  30.0s/step (predicted 25.0s)  MFU 12.3%  37 tokens dropped  "
        "1m30s elapsed, 30s left\n"
        "step 4/4  loss 0.7500  100 tok/s  30.0s/step (predicted 25.0s)  MFU 12.3%  2m00s elapsed\n")


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    assert train.Progress(total=1, log_every=1, stream=Tty()).console is None
    assert not cli.SearchProgress("x", Tty()).tty


def test_search_spinner_on_a_terminal(terminal):
    stderr = sys.stderr
    progress = cli.SearchProgress("gpt-tiny on cpu:8", terminal)
    try:
        progress("data=8: 6.85 ms")
        progress("tensor=8: does not fit")
        assert progress.shown
    finally:
        progress.clear()
    text = terminal.getvalue()
    assert "planning gpt-tiny on cpu:8: 2 meshes considered, last tensor=8: does not fit" in plain(text)
    assert not progress.shown and cursor_shown(text) and text.endswith(UP + "\x1b[2K") and sys.stderr is stderr
    progress.clear()  # (again: nothing more)
    assert terminal.getvalue() == text


def test_search_spinner_stays_one_line_on_a_narrow_terminal(terminal, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = Tty()
    progress = cli.SearchProgress("gpt-175b on a100-80g:1024", narrow)
    try:
        progress("pipe=8,data=16,fsdp=8,tensor=8 (interleaved): 1234.56 ms")
    finally:
        progress.clear()
    drawn = narrow.getvalue().split(HIDE)[1].split(SHOW)[0]
    assert drawn.count("\n") == 1 and drawn.endswith("\n")  # one line, then the newline that stop() writes
    assert "planning gpt-175b" in drawn and "…" in drawn
    assert max(len(frame) for frame in plain(drawn).rstrip("\n").split("\r")) == 40  # cut to the width


def test_search_lines_stay_plain_off_a_terminal():
    stream = io.StringIO()
    progress = cli.SearchProgress("x", stream, every_s=0.0)
    progress("data=8: 1 ms")
    progress("tensor=8: 2 ms")
    progress.clear()
    assert stream.getvalue() == ("planning x: 1 mesh considered, last data=8: 1 ms\n"
                                 "planning x: 2 meshes considered, last tensor=8: 2 ms\n")

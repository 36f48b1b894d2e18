"""Lines stay whole and in the order they were begun, across stdout and stderr (pure)."""

from mino_jupyter.cell import Lines

OUT, ERR = 1, 2


def test_a_line_split_around_another_streams_line_comes_out_whole_and_first():
    """`ls /nonexistent || echo after`: ls writes `ls: ` and the rest in two writes."""
    lines = Lines()
    assert lines.feed(ERR, "ls: ", 0.00) == []
    assert lines.feed(OUT, "after\n", 0.01) == []  # began after the unfinished stderr line
    assert lines.feed(ERR, "cannot access '/nonexistent'\n", 0.02) == [
        (ERR, "ls: cannot access '/nonexistent'\n"), (OUT, "after\n")]


def test_complete_lines_pass_at_once_and_keep_their_order():
    lines = Lines()
    assert lines.feed(OUT, "a\nb\n", 0.0) == [(OUT, "a\nb\n")]
    assert lines.feed(ERR, "e\n", 0.1) == [(ERR, "e\n")]
    assert lines.feed(OUT, "c\n", 0.2) == [(OUT, "c\n")]


def test_a_piece_without_its_end_is_shown_after_a_moment():
    """A prompt or a progress bar is not held back for long."""
    lines = Lines()
    assert lines.feed(OUT, "Password: ", 0.0) == []
    assert abs(lines.wait(0.04) - 0.06) < 1e-9
    assert lines.due(0.05) == []
    assert lines.due(0.1) == [(OUT, "Password: ")]
    assert lines.wait(0.2) is None


def test_a_carriage_return_ends_a_progress_line():
    lines = Lines()
    assert lines.feed(OUT, "10%\r20%\r", 0.0) == [(OUT, "10%\r20%\r")]


def test_a_line_that_never_ends_is_not_kept_in_memory():
    lines = Lines()
    assert lines.feed(OUT, "x" * (Lines.LONGEST + 1), 0.0) == [(OUT, "x" * (Lines.LONGEST + 1))]


def test_the_end_of_the_cell_shows_everything():
    lines = Lines()
    lines.feed(ERR, "no newline", 0.0)
    lines.feed(OUT, "done\n", 0.01)
    assert lines.flush() == [(ERR, "no newline"), (OUT, "done\n")]


def test_the_display_stops_at_its_byte_limit_and_counts_the_rest(capsys):
    from mino_jupyter.magics import _DisplaySink

    sink = _DisplaySink(False, False, max_lines=0, max_bytes=10)
    sink.write(OUT, "0123456")
    sink.write(OUT, "789abc\nmore\n")
    sink.flush()
    assert capsys.readouterr().out == "0123456789"
    assert (sink.hidden_lines, sink.hidden_bytes) == (2, 9)  # "abc\nmore\n"
    free = _DisplaySink(False, False)  # no limits: everything
    free.write(OUT, "x" * 100)
    assert free.hidden_bytes == 0


def test_a_pause_in_the_output_asks_for_a_send_without_waiting_for_it(monkeypatch):
    """A flush on a pause only schedules ipykernel's send on its I/O thread; the kernel waits
    for a send only when a message is full (its memory bound)."""
    import sys
    import threading

    from mino_jupyter.magics import _DisplaySink

    scheduled, flushed = [], []

    class Stream:
        def __init__(self):
            self.pub_thread = type("P", (), {"thread": threading.current_thread(),
                                             "schedule": lambda _self, f: scheduled.append(f)})()

        def _flush(self):
            pass

        def flush(self):
            flushed.append(self)

    monkeypatch.setattr(sys, "stdout", Stream())
    monkeypatch.setattr(sys, "stderr", Stream())
    sink = _DisplaySink(False, False)
    sink.flush_soon()
    assert len(scheduled) == 2 and flushed == []
    sink.flush()
    assert len(flushed) == 2

"""tools/log.py: plain progress lines and OUTDIR/log.txt for batch jobs; a log that cannot be written leaves the console going."""

import errno
import io
import os

from conftest import run_script
from tools.log import _Plain, _Tee


class BrokenLog(io.StringIO):
    name = "runs/x/log.txt"

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_log_that_cannot_be_written_leaves_the_console_going():
    log, out, err = BrokenLog(), io.StringIO(), io.StringIO()
    tee_out, tee_err = _Tee(out, log), _Tee(err, log)
    tee_out.write("epoch 1\n")
    tee_err.write("warning: something\n")
    tee_out.write("epoch 2\n")
    tee_out.flush()
    warnings = (out.getvalue() + err.getvalue()).count("cannot write runs/x/log.txt")
    assert warnings == 1  # stdout and stderr share the log: one warning
    assert "epoch 1\n" in out.getvalue() and out.getvalue().endswith("epoch 2\n") and "warning: something\n" in err.getvalue()


def test_plain_progress_lines(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 70.0, 80.0, 200.0])
    monkeypatch.setattr("tools.log.time.time", lambda: next(clock))
    bar = _Plain(total=4, initial=0, desc="training", unit="step", every_s=60)  # start at t = 0
    bar.set_postfix(loss="0.1234")
    for _ in range(4):
        bar.update(1)  # t = 10 (quiet), 70 (a line), 80 (quiet), 200 (the last: a line)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert "training 2/4 steps (50.0%)" in lines[0] and "loss=0.1234" in lines[0]
    assert "training 4/4 steps (100.0%)" in lines[1]


def test_batch_job_log(trained_digits_run, tmp_path):
    """Not a terminal: plain lines, no carriage returns, and OUTDIR/log.txt holds what was printed."""
    proc = run_script("sample.py", "--outdir", trained_digits_run, "--seeds", "0-3", "--steps", "3", "--out", str(tmp_path / "s"))
    assert "\r" not in proc.stdout + proc.stderr
    log = open(os.path.join(trained_digits_run, "log.txt")).read()
    assert "sample.py --outdir" in log and f"samples: {tmp_path / 's'}" in log

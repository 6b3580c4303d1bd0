"""Terminal output that also reads well in a cluster's log file, copied into OUTDIR/log.txt."""

import contextlib
import os
import socket
import sys
import time

from tqdm import tqdm


class _Tee:
    """A console stream copied to a log file; a log that fails is given up with one warning."""

    failed_logs = set()  # ids: stdout's and stderr's tees share one log

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self._to_log(lambda log: log.write(text))
        return len(text)

    def flush(self):
        self.stream.flush()
        self._to_log(lambda log: log.flush())

    def _to_log(self, action):
        if self.log is None:
            return
        try:
            action(self.log)
        except Exception as e:
            log, self.log = self.log, None
            if id(log) not in _Tee.failed_logs:
                _Tee.failed_logs.add(id(log))
                reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                self.stream.write(f"warning: cannot write {getattr(log, 'name', 'the log file')} ({reason}); output continues on the console only\n")
                with contextlib.suppress(Exception):
                    log.close()  # drops the buffer: closing at exit does not fail again

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


_logs = {}  # path -> open file, so that nested entry points (ema_sweep -> sample) tee once


def to_run_log(outdir):
    """Copy this process's stdout and stderr to OUTDIR/log.txt after a header line (rank 0 only)."""
    path = os.path.abspath(os.path.join(outdir, "log.txt"))
    if path in _logs:
        return path
    os.makedirs(outdir, exist_ok=True)
    log = _logs[path] = open(path, "a", buffering=1)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} pid {os.getpid()}: "
              f"{' '.join([os.path.basename(sys.executable), *sys.argv])}\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    return path


class _Plain:
    """tqdm's interface printing one line per `every_s` seconds and at the end."""

    def __init__(self, total, initial, desc, unit, every_s):
        self.total, self.n, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.start_n, self.start = initial, time.time()
        self.last, self.postfix = self.start, ""

    def update(self, n=1):
        self.n += n
        now = time.time()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 * 30 else "?"
            units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.desc} {self.n}/{self.total} {units} "
                  f"({100 * self.n / max(self.total, 1):.1f}%), {rate:.3g} {self.unit}/s, eta {eta_text}"
                  + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def set_postfix(self, refresh=False, **values):
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        pass


def progress(total, initial=0, desc="", unit="step", enabled=True, every_s=60.0):
    """tqdm on a terminal (not copied into log.txt), plain lines otherwise, nothing if not enabled."""
    stderr = sys.stderr.stream if isinstance(sys.stderr, _Tee) else sys.stderr
    if not enabled or stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.__stderr__, disable=not enabled)
    return _Plain(total, initial, desc, unit, every_s)

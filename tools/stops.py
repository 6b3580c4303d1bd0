"""Checkpoints between epochs: on SIGTERM, SIGINT or SIGUSR1 (then training stops) and every train.checkpoint_minutes."""

import signal
import time

from tools import dist


class StopRequests:
    """Signal handlers while training runs (a context manager); poll() says what the ranks agree to do now."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    SYNC_STEPS = 10

    def __init__(self, minutes, rank, world):
        self.every_s, self.rank, self.world = 60 * minutes, rank, world
        self.signum, self.previous = None, {}
        self.last_save = time.time()

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _request(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def poll(self, step):
        """(signal number or None, whether a time-based checkpoint is due), the same on every rank."""
        due = self.every_s > 0 and time.time() - self.last_save >= self.every_s and self.rank == 0
        if self.world == 1:
            return self.signum, due
        if step % self.SYNC_STEPS:
            return None, False
        signum, due = dist.max_over_ranks([float(self.signum or 0), float(due)])  # host to host: no device sync
        return (int(signum) or None), bool(due)

    def saved(self):
        self.last_save = time.time()

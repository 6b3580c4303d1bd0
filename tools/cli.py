"""Command-line plumbing of the entry scripts: user errors end in one line and exit code 2; flag parsers."""

import os
import sys


class UserError(Exception):
    """A mistake the user can fix, the message says how; rank 0 alone prints it unless `shared` is False."""

    shared = None


class Stopped(Exception):
    """Training stopped on a signal after writing a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def first_line(error):
    return (str(error).splitlines() or [type(error).__name__])[0]


def parse_numbers(text, flag):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def parse_seeds(text):
    """'0-49999' or '0,3,10-19' -> sorted unique non-negative ints; a range holds both ends."""
    seeds = set()
    for part in text.split(","):
        lo, dash, hi = (s.strip() for s in part.partition("-"))
        if not (lo.isascii() and lo.isdigit() and (not dash or hi.isascii() and hi.isdigit() and int(lo) <= int(hi))):
            raise UserError(f"--seeds must look like 0-49999 or 0,5,10-19 (non-negative integers, ranges low-high with low <= high), got {text!r}")
        seeds.update(range(int(lo), int(hi or lo) + 1))
    return sorted(seeds)


def run_main(main):
    """Run main(): a UserError ends in one line and exit 2, a stop on a signal in 128 + its number."""
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        main()
    except UserError as e:
        if rank == 0 or e.shared is False:
            print(f"error{'' if rank == 0 else f' (rank {rank})'}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        if rank == 0:
            print(str(e), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)

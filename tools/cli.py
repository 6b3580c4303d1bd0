"""Command-line plumbing shared by the entry scripts: user errors end in one line and exit code 2; flag parsers.

Under torchrun every rank runs the same script on the same files and meets the same mistake; the line
is printed by rank 0 alone (torchrun's own failure report follows it). Code that knows an error is its
rank's own marks it `shared = False`, and that rank prints it with its number.
"""

import os
import sys


class UserError(Exception):
    """A mistake the user can fix (bad key, missing data, broken checkpoint). The message says how.

    `shared`: whether every rank raises it; None (unknown) counts as yes, False makes a rank other than 0
    print it too."""

    shared = None


class Stopped(Exception):
    """Training stopped cleanly on a signal after writing a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def parse_numbers(text, flag):
    """'1,1.5,2' -> [1.0, 1.5, 2.0] for a comma-separated flag; UserError naming the flag otherwise."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def parse_seeds(text):
    """'0-49999' or '0,3,10-19' -> sorted unique list of non-negative ints; a range holds both ends, low <= high."""
    seeds = set()
    for part in text.split(","):
        lo, dash, hi = (s.strip() for s in part.partition("-"))
        if not (lo.isascii() and lo.isdigit() and (not dash or hi.isascii() and hi.isdigit() and int(lo) <= int(hi))):
            raise UserError(f"--seeds must look like 0-49999 or 0,5,10-19 (non-negative integers, ranges low-high "
                            f"with low <= high), got {text!r}")
        seeds.update(range(int(lo), int(hi or lo) + 1))
    return sorted(seeds)


def run_main(main):
    """Run main(); a UserError prints `error: <message>` on one line and exits 2, a clean stop on a signal
    exits 128 + the signal number after one line, and Ctrl-C outside training exits 130."""
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        main()
    except UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif e.shared is False:
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        if rank == 0:
            print(str(e), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)

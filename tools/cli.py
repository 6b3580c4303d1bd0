"""Command-line plumbing shared by the entry scripts: user errors end in one line and exit code 2."""

import sys


class UserError(Exception):
    """A mistake the user can fix (bad key, missing data, broken checkpoint). The message says how."""


def run_main(main):
    """Run main(); a UserError prints `error: <message>` on one line and exits 2, Ctrl-C exits 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)

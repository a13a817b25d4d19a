"""One exception type for bad input, and the CLI wrapper that turns it into one line and exit status 2."""
from __future__ import annotations

import sys
import traceback


class UserError(Exception):
    """Bad input the user can fix. The message is one line saying what is wrong and what to do."""


def run_cli(main, argv=None) -> int:
    """Run a CLI entry point: UserError -> one line on stderr, status 2 (a traceback only with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv) or 0
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

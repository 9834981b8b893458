"""One-line errors for mistakes a user can fix, and the entry-point wrapper that prints them."""

import sys


class UserError(Exception):
    """A problem the user caused and can fix. Printed as one line, never as a traceback."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; a UserError ends the process with one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "textual_inversion"
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)

"""One-line errors for mistakes a user can fix, and the entry-point wrapper that prints them."""

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user caused and can fix. Printed as one line, never as a traceback."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; a UserError ends the process with one line on stderr and exit code 2.

    Warnings raised by this package (skipped files, ...) are printed as one line too, without the
    default second line that quotes our source code.
    """
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "textual_inversion"
    default_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
            return f"{prog}: warning: {message}\n"
        return default_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        return main(argv)
    except UserError as err:
        _close_progress_bars()
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def _close_progress_bars():
    """Close live tqdm bars now: closed at exit instead, they would print below the error line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()

"""The one exception type for mistakes a user can make (bad config, bad data, missing files).

Entry points catch it, print its message as one line and exit with `exit_code`; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    exit_code = 2


def run_cli(run: Callable[[T], None], args: T) -> int:
    """Run an entry point's `run(args)`; a UserError becomes one line on stderr and its exit code."""
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0

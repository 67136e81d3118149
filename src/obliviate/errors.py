"""User errors: what the user can fix (bad input, bad options, a run directory in the way).

Every layer raises a subclass of :class:`UserError` (or ``ValueError`` for option checks) for a
mistake the user made; the CLI prints its message as one line and exits with code 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what, where and how to fix it."""

    exit_code = 2

"""Errors that are the user's to fix, and how the command line shows them.

A `UserError` says that what the user gave cannot work: a config value, a path, the data,
the weights, a checkpoint. Its message names the thing, the value and the fix, so the CLI
prints it as one line and exits with status 2: a traceback would only bury it. Anything
else is a bug in tlflax and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """What the user gave cannot work; the message says what, and what to do."""


class ConfigError(UserError, ValueError):
    """A config value (or a combination of them) that cannot work."""

"""The one error class a person running the pipeline is meant to read.

Everything that is the user's to fix (a bad config key, a missing file, an unreachable store, a
refused promotion) raises a subclass of `UserError`; the CLI prints it as one line and exits 2.
Anything else is a bug in this project and keeps its traceback, so a defect never hides behind a
tidy message.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line that names the input."""

"""The one error class a person running the pipeline is meant to read, and how URIs are shown.

Everything that is the user's to fix (a bad config key, a missing file, an unreachable store, a
refused promotion) raises a subclass of `UserError`; the CLI prints it as one line and exits 2.
Anything else is a bug in this project and keeps its traceback, so a defect never hides behind a
tidy message.

URIs come from the environment and the config (`MLFLOW_TRACKING_URI`, S3 endpoints, database
stores) and may carry a password or a token. `redact` masks those wherever a URI is printed or
logged, so an error line can be pasted into a ticket without leaking the credential.
"""

from __future__ import annotations

import re

MASK = "***"

# `scheme://user:password@host`: the userinfo ends at the last `@` before the host's first `/`.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")
# `?token=...` and the like: any query parameter whose name says it holds a secret.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&;#\s]*(?:token|secret|password|passwd|pwd|key|signature|credential|auth|session)"
    r"[^=&;#\s]*=)(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line that names the input."""


class ArgumentError(UserError, ValueError):
    """A command argument the command cannot use (an empty question, zero rows); names the argument."""


class OutputNotEmpty(UserError, FileExistsError):
    """An output folder that already holds files, which the command refuses to overwrite."""


def redact(uri: str) -> str:
    """``uri`` (or a message quoting URIs) with userinfo and secret-looking query values masked.

    ``http://alice:s3cret@mlflow:5000/?token=abc`` becomes ``http://***@mlflow:5000/?token=***``:
    the host and path stay, since they are what the reader needs to find the misconfigured store.
    """
    masked = _USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", uri)
    return _SECRET_PARAM.sub(lambda match: f"{match['name']}{MASK}", masked)

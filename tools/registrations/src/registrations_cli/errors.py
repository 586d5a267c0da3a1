"""The one error the command shows: a single line for a human, and an exit code."""

from __future__ import annotations

from regbridge.redact import redact_url

# Exit codes: 0 done; 1 the command could not do its work (broker down, invalid rows, nothing
# found); 2 it was called wrongly (argparse uses 2 as well) or is misconfigured.
FAILED = 1
USAGE = 2


class CliError(Exception):
    """Shown as `registrations: <message>` on stderr, then the command exits with `code`."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        # Whatever a library put in the text, no credentials leave through it.
        super().__init__(redact_url(message))
        self.code = code

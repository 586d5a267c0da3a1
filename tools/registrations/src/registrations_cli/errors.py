"""The one error the command shows: a single line for a human, and an exit code."""

from __future__ import annotations

from regbridge.redact import redact_url

# Exit codes, documented in `registrations --help` and the README:
DONE = 0
FAILED = 1  # nothing, or not everything, could be done (broker down, invalid rows, nothing found, "no")
USAGE = 2  # called wrongly (argparse uses 2 as well), misconfigured, or no consent to a destructive act
PARTIAL = 3  # stopped midway: some of the work is done, the rest is not (the message says which)
INTERRUPTED = 130  # Ctrl-C, as a shell reports a process that SIGINT ended


class CliError(Exception):
    """Shown as `registrations: <message>` on stderr, then the command exits with `code`."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        # Whatever a library put in the text, no credentials leave through it.
        super().__init__(redact_url(message))
        self.code = code

"""Consent before a destructive command acts (`failed replay`, `failed discard`).

As kubectl and rabbitmqadmin users expect: on a terminal the command asks, and only `y` or
`yes` goes ahead; `--yes` skips the question. With no terminal to ask on (a script, a pipe, a
Job) and no `--yes`, it refuses before touching anything: a script that worked on an empty
queue must not empty a full one unasked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from .errors import FAILED, USAGE, CliError
from .sanitize import visible


@dataclass
class Consent:
    yes: bool = False  # --yes: consent given on the command line
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def can_ask(self) -> bool:
        # The question goes to stderr so that stdout stays the result, even on a terminal.
        return self.stdin.isatty() and self.stderr.isatty()

    @property
    def needs_asking(self) -> bool:
        return not self.yes

    def check(self, command: str) -> None:
        """Before any work: refuse (exit code 2) when consent can be neither given nor asked for."""
        if not self.yes and not self.can_ask:
            raise CliError(f"{command} changes the queues and asks first, but there is no terminal to ask on: "
                           "pass --yes (-y) to go ahead without asking, or --dry-run to see what it would do",
                           USAGE)

    def ask(self, question: str) -> bool:
        """`question [y/N]` on the terminal; True for y or yes. Always True with --yes."""
        if self.yes:
            return True
        self.stderr.write(f"{visible(question)} [y/N] ")
        self.stderr.flush()
        answer = self.stdin.readline()
        if not answer.endswith("\n"):  # end of input: no answer, so no
            self.stderr.write("\n")
        return answer.strip().lower() in ("y", "yes")

    def require(self, question: str, declined: str) -> None:
        """Ask; a no ends the command with exit code 1 and `declined` as its message."""
        if not self.ask(question):
            raise CliError(declined, FAILED)

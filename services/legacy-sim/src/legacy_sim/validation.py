"""Syntactic validation of a registration body, per the Registration schema of the OpenAPI file.

Pure functions on bytes, so the rules are unit-tested without HTTP. Hand-written rather than
pydantic because this runs for every POST and must stay cheap.
"""

from __future__ import annotations

import json
import re
from typing import Any

# fullmatch with [0-9]: `$` would accept a trailing newline and \d would accept non-ASCII digits.
_CPF = re.compile(r"[0-9]{11}")


class InvalidRegistration(ValueError):
    """The body is not a valid registration; the message is the reason sent back in the 400."""


def parse_registration(raw: bytes) -> dict[str, Any]:
    """Returns the registration object, or raises InvalidRegistration with a clear reason."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers both malformed JSON and bytes that are not UTF-8.
        raise InvalidRegistration("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRegistration("body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRegistration("name is required and must be a non-empty string")
    email = body.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise InvalidRegistration("email is required and must be a string containing '@'")
    cpf = body.get("cpf")
    if not isinstance(cpf, str) or _CPF.fullmatch(cpf) is None:
        raise InvalidRegistration("cpf is required and must be a string of exactly 11 digits")
    if "user_id" in body and not isinstance(body["user_id"], str):
        raise InvalidRegistration("user_id must be a string when present")
    return body

"""MongoDB, read-only: the users' registration fields."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError, ServerSelectionTimeoutError

from .errors import CliError
from .settings import CliSettings

FIELDS = ("registration_status", "legacy_request_id", "registration_updated_at", "registration_error")
STATUSES = ("submitted", "registered", "failed")


@contextmanager
def users(settings: CliSettings, timeout_s: float = 5.0) -> Iterator[Collection[dict[str, Any]]]:
    """The users collection; a one-line error when MongoDB cannot be reached or used."""
    where = settings.mongodb_shown
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=int(timeout_s * 1000),
            connectTimeoutMS=int(timeout_s * 1000), socketTimeoutMS=int(timeout_s * 2000))
    except (ConfigurationError, InvalidURI, ValueError):
        raise CliError("MONGODB_URI is not a usable MongoDB URI (value not shown: it may hold credentials)") from None
    try:
        yield client[settings.mongodb_database][settings.mongodb_collection]
    except ServerSelectionTimeoutError:
        raise CliError(f"cannot reach MongoDB at {where} (no server answered within {timeout_s:g} s)") from None
    except PyMongoError as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CliError(f"MongoDB at {where}: {text}") from None
    finally:
        with suppress(Exception):
            client.close()


def registration(collection: Collection[dict[str, Any]], user_id: str) -> dict[str, Any] | None:
    """The user's registration fields, or None when there is no document for the user."""
    doc = collection.find_one({"_id": user_id}, {name: 1 for name in FIELDS})
    if doc is None:
        return None
    return {name: doc.get(name) for name in FIELDS}


def outcome_counts(collection: Collection[dict[str, Any]]) -> dict[str, int]:
    return {status: int(collection.count_documents({"registration_status": status})) for status in STATUSES}

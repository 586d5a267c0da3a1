"""MongoDB: the users' registration fields, read only; the one index `stats` counts with, which
only `init-indexes` creates; and the database that holds the failure queue's index (`index.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError, ServerSelectionTimeoutError

from .errors import CliError
from .settings import CliSettings

FIELDS = ("registration_status", "legacy_request_id", "registration_updated_at", "registration_error")
STATUSES = ("submitted", "registered", "failed")


@contextmanager
def database(settings: CliSettings, timeout_s: float = 5.0,
             answer_timeout_s: float | None = 10.0) -> Iterator[Database[dict[str, Any]]]:
    """The pipeline's database; a one-line error when MongoDB cannot be reached or used.
    `answer_timeout_s`: how long one operation may take (None: as long as it takes)."""
    where = settings.mongodb_shown
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=int(timeout_s * 1000),
            connectTimeoutMS=int(timeout_s * 1000),
            socketTimeoutMS=None if answer_timeout_s is None else int(answer_timeout_s * 1000))
    except (ConfigurationError, InvalidURI, ValueError):
        raise CliError("MONGODB_URI is not a usable MongoDB URI (value not shown: it may hold credentials)") from None
    try:
        yield client[settings.mongodb_database]
    except ServerSelectionTimeoutError:
        raise CliError(f"cannot reach MongoDB at {where} (no server answered within {timeout_s:g} s)") from None
    except PyMongoError as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CliError(f"MongoDB at {where}: {text}") from None
    finally:
        with suppress(Exception):
            client.close()


@contextmanager
def users(settings: CliSettings, timeout_s: float = 5.0,
          answer_timeout_s: float | None = 10.0) -> Iterator[Collection[dict[str, Any]]]:
    """The users collection (see `database`)."""
    with database(settings, timeout_s, answer_timeout_s) as db:
        yield db[settings.mongodb_collection]


def registration(collection: Collection[dict[str, Any]], user_id: str) -> dict[str, Any] | None:
    """The user's registration fields, or None when there is no document for the user."""
    doc = collection.find_one({"_id": user_id}, {name: 1 for name in FIELDS})
    if doc is None:
        return None
    return {name: doc.get(name) for name in FIELDS}


# The index `stats` counts by. Only `init-indexes` creates it: building an index on a large
# production collection costs I/O and CPU on every member, so it is the operator's decision.
STATUS_KEY = "registration_status"
STATUS_INDEX = f"{STATUS_KEY}_1"


def status_index(collection: Collection[dict[str, Any]]) -> str | None:
    """The name of an index that leads with `registration_status` (whoever created it), or None.
    A partial index is passed over: its filter may leave out users of some status."""
    for index in collection.list_indexes():
        key = index.get("key") or {}
        if next(iter(key), None) == STATUS_KEY and "partialFilterExpression" not in index:
            return str(index["name"])
    return None


def ensure_status_index(collection: Collection[dict[str, Any]], *, dry_run: bool = False) -> tuple[str, str]:
    """(index name, what happened: "found", "created", or "missing" with dry_run). An index that
    is there already is kept as it is."""
    found = status_index(collection)
    if found is not None:
        return found, "found"
    if dry_run:
        return STATUS_INDEX, "missing"
    return collection.create_index([(STATUS_KEY, 1)], name=STATUS_INDEX), "created"


def outcome_counts(collection: Collection[dict[str, Any]]) -> dict[str, int] | None:
    """Users per status, counted on the status index; None when there is no such index, because
    without it each count reads every document of the collection."""
    if status_index(collection) is None:
        return None
    # An equality on the index's leading field: mongod counts it from the index alone, and
    # SecantusDB looks up only the matching documents. No `hint`: SecantusDB walks a hinted
    # index from end to end whatever the filter.
    return {status: int(collection.count_documents({STATUS_KEY: status})) for status in STATUSES}


def estimated_users(collection: Collection[dict[str, Any]]) -> int:
    """The collection's size from its metadata (mongod reads no document for it)."""
    return int(collection.estimated_document_count())

"""The plain threaded design, for comparison: one process, one thread per in-flight registration.

Each thread POSTs, sleeps until the first poll, polls every interval until a final status, and
writes MongoDB; the main thread owns the pika connection and acks through
`add_callback_threadsafe`. Waiting registrations live in this process as sleeping threads, which
is what the pipeline avoids. It prints `progress <submitted> <finished>` lines for the bench.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pika
import requests
from pymongo import MongoClient
from requests.adapters import HTTPAdapter


def main() -> None:
    n = int(os.environ["BENCH_N"])
    first_delay = float(os.environ["POLL_FIRST_DELAY_S"])
    interval = float(os.environ["POLL_INTERVAL_S"])
    base = os.environ["LEGACY_API_URL"]
    client: MongoClient[dict[str, Any]] = MongoClient(os.environ["MONGODB_URI"])
    users = client[os.environ["MONGODB_DATABASE"]][os.environ.get("MONGODB_COLLECTION", "users")]
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=256))

    connection = pika.BlockingConnection(pika.URLParameters(os.environ["RABBITMQ_URL"]))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=0)  # no limit: every waiting registration holds a thread
    lock = threading.Lock()
    counts = {"submitted": 0, "finished": 0}

    def work(body: bytes, tag: int) -> None:
        registration = json.loads(body)
        user_id = registration["user_id"]
        while True:
            response = session.post(f"{base}/v1/registrations", data=body,
                                    headers={"Content-Type": "application/json"}, timeout=10)
            if response.status_code == 201:
                break
            time.sleep(0.5)
        request_id = response.json()["request_id"]
        users.update_one({"_id": user_id}, {"$set": {"registration_status": "submitted",
                                                     "legacy_request_id": request_id,
                                                     "registration_updated_at": datetime.now(UTC)}}, upsert=True)
        with lock:
            counts["submitted"] += 1
        time.sleep(first_delay)
        while True:
            answer = session.get(f"{base}/v1/registrations/{request_id}", timeout=10)
            status = answer.json().get("status") if answer.status_code == 200 else "processing"
            if status != "processing":
                break
            time.sleep(interval)
        users.update_one({"_id": user_id}, {"$set": {
            "registration_status": "registered" if status == "completed" else "failed",
            "registration_updated_at": datetime.now(UTC)}})
        with lock:
            counts["finished"] += 1
        connection.add_callback_threadsafe(functools.partial(channel.basic_ack, tag))

    def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
        threading.Thread(target=work, args=(body, method.delivery_tag), daemon=True).start()

    channel.basic_consume(os.environ.get("INBOUND_QUEUE", "registrations"), on_message)
    last = 0.0
    while counts["finished"] < n:
        connection.process_data_events(time_limit=0.05)
        if time.monotonic() - last >= 0.25:
            last = time.monotonic()
            print(f"progress {counts['submitted']} {counts['finished']}", flush=True)
    print(f"progress {counts['submitted']} {counts['finished']}", flush=True)
    connection.process_data_events(time_limit=0.5)  # let the last acks go out
    connection.close()


if __name__ == "__main__":
    sys.exit(main())

"""Publishes sample registrations to INBOUND_QUEUE, then exits: the `demo` profile of docker-compose.yml.

Mostly good registrations, plus a few of each failure: names the legacy system refuses (stage
`legacy`), an invalid CPF (`submit`) and bodies that are not registrations (`validation`), so
that every panel of the dashboard has something to show. Runs in the submitter image, which has
pika and regbridge; persistent messages with publisher confirms, the inbound queue declared with
the same arguments the submitter uses.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pika

from regbridge.topology import work_queue


def samples(count: int, run: str) -> list[bytes]:
    bodies: list[bytes] = []
    for i in range(count):
        user_id = f"sample-{run}-{i:05d}"
        body = {"user_id": user_id, "name": "Maria da Silva", "email": f"{user_id}@example.com",
                "cpf": f"{10000000000 + i * 7919:011d}"}
        if i % 25 == 7:
            body["name"] = "FAIL Refused By Legacy"  # legacy-sim finishes these `failed`
        elif i % 50 == 13:
            body["cpf"] = "123"  # a 400 from the legacy API
        elif i % 100 == 42:
            bodies.append(b"not a registration")
            continue
        bodies.append(json.dumps(body).encode())
    return bodies


def main() -> int:
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/%2F")
    queue = os.environ.get("INBOUND_QUEUE", "registrations")
    count = int(os.environ.get("SAMPLE_COUNT", "200"))
    run = uuid.uuid4().hex[:6]
    # One URL, or the comma-separated URLs of a cluster's nodes (the `cluster` profile): pika tries
    # them in turn until one takes the connection.
    nodes = [pika.URLParameters(part.strip()) for part in url.split(",") if part.strip()]
    connection = pika.BlockingConnection(nodes)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        spec = work_queue(queue)
        channel.queue_declare(queue, durable=True, arguments=dict(spec.arguments))
        started = time.monotonic()
        for n, body in enumerate(samples(count, run)):
            properties = pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                              message_id=f"sample-{run}-{n}")
            channel.basic_publish("", queue, body, properties, mandatory=True)
        print(f"published {count} sample registrations to {queue!r} in {time.monotonic() - started:.1f} s "
              f"(run {run})", flush=True)
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`submitter`: consume inbound registrations, submit them, hand them on to the pending stage."""

from __future__ import annotations

import os

from regbridge import process, store
from regbridge.amqp import AmqpRuntime, RuntimeHooks
from regbridge.legacy_http import LegacyClient
from regbridge.settings import submitter_settings
from regbridge.topology import submitter_queues
from submitter import metrics
from submitter.service import Submitter


def main() -> None:
    settings = process.load_settings("submitter", submitter_settings, os.environ)
    process.setup_logging("submitter", settings)
    mongo = store.MongoStore(store.connect(settings.mongodb_uri, pool_size=max(2, settings.workers // 4)),
                             settings.mongodb_database, settings.mongodb_collection,
                             settings.attempts_collection)
    legacy = LegacyClient(settings.legacy_api_url, timeout_s=settings.legacy_timeout_s,
                          pool_size=settings.workers)
    submitter = Submitter(settings, store=mongo, legacy=legacy)
    runtime = AmqpRuntime(
        url=settings.rabbitmq_url,
        queues=submitter_queues(inbound=settings.inbound_queue, pending=settings.pending_queue,
                                failed=settings.failed_queue, first_delay_s=settings.poll_first_delay_s),
        consume=[settings.inbound_queue],
        handler=submitter.handle,
        workers=settings.workers,
        prefetch=settings.prefetch,
        reconnect_max_s=settings.reconnect_max_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        hooks=RuntimeHooks(on_delivery=lambda d: metrics.CONSUMED.inc(),
                           on_disconnected=metrics.RECONNECTS.inc,
                           on_queue_depth=lambda queue, n: metrics.QUEUE_MESSAGES.labels(queue).set(n)),
        name="submitter",
    )
    submitter.broker = runtime
    process.run("submitter", settings, runtime, mongo)


if __name__ == "__main__":
    main()

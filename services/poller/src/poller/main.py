"""`poller`: poll pending ids, wait between polls in the broker, finalise each registration."""

from __future__ import annotations

import os

from poller import metrics
from poller.service import Poller
from regbridge import process, store
from regbridge.amqp import AmqpRuntime, RuntimeHooks
from regbridge.legacy_http import LegacyClient
from regbridge.settings import poller_settings
from regbridge.topology import poller_queues


def main() -> None:
    settings = process.load_settings("poller", poller_settings, os.environ)
    process.setup_logging("poller", settings)
    mongo = store.MongoStore(store.connect(settings.mongodb_uri, pool_size=max(2, settings.workers // 4)),
                             settings.mongodb_database, settings.mongodb_collection,
                             settings.attempts_collection)
    legacy = LegacyClient(settings.legacy_api_url, timeout_s=settings.legacy_timeout_s,
                          pool_size=settings.workers)
    poller = Poller(settings, store=mongo, legacy=legacy)
    runtime = AmqpRuntime(
        url=settings.rabbitmq_url,
        queues=poller_queues(pending=settings.pending_queue, failed=settings.failed_queue,
                             delays=poller.policy.tiers()),
        consume=[settings.pending_queue],
        handler=poller.handle,
        workers=settings.workers,
        prefetch=settings.prefetch,
        reconnect_max_s=settings.reconnect_max_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        hooks=RuntimeHooks(on_delivery=lambda d: metrics.CONSUMED.inc(),
                           on_disconnected=metrics.RECONNECTS.inc,
                           on_queue_depth=lambda queue, n: metrics.QUEUE_MESSAGES.labels(queue).set(n)),
        name="poller",
    )
    poller.broker = runtime
    process.run("poller", settings, runtime, mongo)


if __name__ == "__main__":
    main()

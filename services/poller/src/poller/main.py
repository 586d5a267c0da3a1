"""`poller`: poll pending ids, wait between polls in the broker, finalise each registration."""

from __future__ import annotations

import os

from poller import metrics
from poller.service import Poller
from regbridge import process
from regbridge.settings import poller_settings
from regbridge.topology import poller_queues


def main() -> None:
    settings = process.load_settings("poller", poller_settings, os.environ)
    process.setup_logging("poller", settings)
    mongo, legacy = process.adapters(settings, metrics.EDGE)
    poller = Poller(settings, legacy=legacy)
    queues = poller_queues(pending=settings.pending_queue, failed=settings.failed_queue,
                           delays=poller.tiers(), group_size=settings.quorum_initial_group_size)
    process.serve("poller", settings, queues=queues, consume=settings.pending_queue, store=mongo,
                  handler=lambda _durable: poller, metrics=metrics.EDGE, finished=metrics.finished)


if __name__ == "__main__":
    main()

"""`submitter`: consume inbound registrations, submit them, hand them on to the pending stage."""

from __future__ import annotations

import os

from regbridge import process
from regbridge.settings import Schedule, submitter_settings
from regbridge.topology import submitter_queues
from submitter import metrics
from submitter.service import Submitter


def main() -> None:
    settings = process.load_settings("submitter", submitter_settings, os.environ)
    process.setup_logging("submitter", settings)
    mongo, legacy = process.adapters(settings, metrics.EDGE)
    queues = submitter_queues(inbound=settings.inbound_queue, pending=settings.pending_queue,
                              failed=settings.failed_queue, first_delay_s=settings.poll_first_delay_s,
                              adaptive=settings.poll_schedule is Schedule.ADAPTIVE,
                              group_size=settings.quorum_initial_group_size)
    process.serve("submitter", settings, queues=queues, consume=settings.inbound_queue, store=mongo,
                  handler=lambda durable: Submitter(settings, store=mongo, legacy=legacy, durable=durable),
                  metrics=metrics.EDGE, finished=metrics.finished)


if __name__ == "__main__":
    main()

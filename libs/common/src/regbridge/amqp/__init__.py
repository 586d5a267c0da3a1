"""The RabbitMQ adapter: one I/O thread owns the pika connection; worker threads do the work.

pika is not thread-safe. The only call other threads make is `add_callback_threadsafe`,
through the call queue; everything else (publish, ack, nack, timers) runs on the I/O thread
that `AmqpRuntime.run()` turns. Workers get a `Future` for each publish, settled by the
broker's publisher confirm (or failed by a nack, a return of an unroutable message, or a lost
channel), so nothing is acknowledged before what it led to is stored.

The parts, each in its module:
- `calls`: the call queue into the I/O thread, with batched wake-ups;
- `link`: connection and channel: connect with backoff, declare, consume, queue depths;
- `confirms`: publisher confirms and returns of the current channel;
- `hops`: how long a hop the broker refused waits before its delivery goes back;
- `pool`: the worker threads, deferred work, and the count of what is in hand;
- `shutdown`: the graceful stop;
- `runtime`: `AmqpRuntime`, which puts them together behind the calls handlers make.
"""

from regbridge.amqp.model import Delivery, Handler, PublishError, PublishRefused, RuntimeHooks, TopologyConflict
from regbridge.amqp.runtime import AmqpRuntime

__all__ = ["AmqpRuntime", "Delivery", "Handler", "PublishError", "PublishRefused", "RuntimeHooks", "TopologyConflict"]

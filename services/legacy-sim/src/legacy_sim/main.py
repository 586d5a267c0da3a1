"""Entry point of the `legacy-sim` console script."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from legacy_sim.app import create_app
from legacy_sim.config import ConfigError, load_config


def _absorb_signal(signum: int, frame: FrameType | None) -> None:
    # uvicorn restores the previous handler after its graceful shutdown and re-raises the
    # signal it caught; with the default handlers that would end the process with -15 or a
    # KeyboardInterrupt instead of exit code 0.
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ)
    except ConfigError as exc:
        print(f"legacy-sim: invalid configuration: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            # "auto" picks uvloop and httptools when they are installed (uvicorn[standard]).
            loop="auto",
            http="auto",
            ws="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            # Many benchmark clients keep connections open between polls.
            backlog=4096,
            timeout_keep_alive=30,
        )
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _absorb_signal)
    print(
        f"legacy-sim listening on http://{config.host}:{config.port} "
        f"(latency profile {config.profile})",
        flush=True,
    )
    server.run()
    # A failed bind leaves the server not started; that is an error, not a clean stop.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

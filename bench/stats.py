"""`registrations stats` on N user documents (default 1,000,000) in a SecantusDB of its own:
the counts stats ran before (no index), `stats` without the index, `init-indexes`, and `stats`
with the index. Writes `bench/results/<stamp>-stats-n<N>.json`. Figures are measured and
reported, never asserted (tests/integration/test_cli_stats.py runs the same at 50,000).

    .venv/bin/python bench/stats.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402
import stats_scale  # noqa: E402
from pymongo import MongoClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="user documents (default 1,000,000)")
    args = parser.parse_args()
    mongo = harness.start_secantus()
    try:
        with harness.vhost("bench-stats") as amqp_url:
            database = f"bench_{uuid.uuid4().hex[:8]}"
            env = harness.service_env(rabbitmq_url=amqp_url, mongodb_uri=mongo.uri, database=database,
                                      legacy_url="http://127.0.0.1:9")
            client: MongoClient[dict[str, object]] = MongoClient(mongo.uri, tz_aware=True)
            figures = stats_scale.measure(client[database]["users"], env, args.n,
                                          log=lambda line: print(line, flush=True))
            figures["mongodb"] = "SecantusDB (python -m secantus), on this machine"
            client.close()
    finally:
        mongo.stop()
        shutil.rmtree(mongo.storage, ignore_errors=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = HERE / "results" / f"{stamp}-stats-n{args.n}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()

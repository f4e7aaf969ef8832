#!/usr/bin/env bash
# Throughput benchmark on the simulated heterogeneous fleet; see `gateway bench --help`.
# Usage: scripts/bench.sh [--scenarios throughput,round_robin,adapt,replicas,overhead] [--duration 60] [--quick] ...
# Needs the Redis at redis://127.0.0.1:6379/0 for the `replicas` scenario (or --redis-url).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/gateway ]; then
  make install
fi
exec .venv/bin/gateway bench "$@"

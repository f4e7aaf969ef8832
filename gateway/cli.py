"""`gateway` command line: serve, demo, sim, check-config, spend, bench, cpu-ab, top."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from gateway.config import ConfigError, check_warnings, load_fleet
from gateway.settings import Settings


def _settings(**overrides) -> Settings:
    """Settings from GATEWAY_* env plus flags; a bad value exits with a readable message, not a traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                msg = "GATEWAY_" + "_".join(str(x) for x in err["loc"]).upper() + ": " + msg
            print(msg, file=sys.stderr)
        raise SystemExit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_gateway(settings: Settings, reuse_port: bool = False) -> None:
    from gateway.http.app import create_app, serve

    try:
        app = create_app(settings)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2)
    try:
        serve(app, settings, reuse_port=reuse_port)
    except OSError as e:
        print(f"gateway: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2)


def usable_cores() -> int:
    """CPU cores this process may use: its affinity set, capped by a cgroup v2 CPU quota (a container's limit;
    os.cpu_count() would report the whole node's)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cmd_serve(ns: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", ns.host), ("port", ns.port), ("config", ns.config)) if v is not None}
    settings = _settings(**overrides)
    _logging(settings.log_level)
    workers = ns.workers if ns.workers is not None else (usable_cores() if settings.redis_url else 1)
    if workers <= 1:
        _run_gateway(settings, reuse_port=ns.reuse_port)
        return 0
    if not settings.redis_url:
        print("--workers > 1 needs GATEWAY_REDIS_URL so the processes share one fleet view", file=sys.stderr)
        return 2
    # N processes on one port (SO_REUSEPORT); each is its own replica sharing Redis.
    args = [sys.executable, "-m", "gateway", "serve", "--reuse-port", "--workers", "1"]
    for flag, v in (("--host", ns.host), ("--port", ns.port), ("--config", ns.config)):
        if v is not None:
            args += [flag, str(v)]
    procs = [
        subprocess.Popen(args, env={**os.environ, "GATEWAY_REPLICA_ID": f"{settings.replica_id}-w{i}"}, preexec_fn=_die_with_parent)
        for i in range(workers)
    ]

    def forward(sig, _frame):
        for p in procs:
            p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(p.wait() for p in procs)


def _die_with_parent() -> None:
    """In a worker process: receive SIGTERM when the supervising process dies, even by SIGKILL (Linux), so no
    worker is left serving on its own (they drain on SIGTERM as usual)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor forwards SIGTERM/SIGINT itself


def cmd_demo(ns: argparse.Namespace) -> int:
    """Simulated fleet on three ports from --sim-port (9101-9103) plus the gateway (:8080), in one process."""
    from gateway.tools.demo import run_demo

    settings = _settings(port=ns.port)
    _logging(settings.log_level)
    return run_demo(settings, ns.sim_port)


def cmd_sim(ns: argparse.Namespace) -> int:
    from gateway.sim.server import config_from_args, serve_forever

    _logging("INFO")
    try:
        asyncio.run(serve_forever(config_from_args(ns), ns.host, ns.port))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check_config(ns: argparse.Namespace) -> int:
    settings = _settings()
    path = ns.path or settings.config
    try:
        fleet = load_fleet(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for w in check_warnings(fleet):
        print(f"warning: {w}")
    print(f"{path}: ok — {len(fleet.upstreams)} upstreams, {len(fleet.models)} models")
    for name, m in fleet.models.items():
        print(f"  {name}: {', '.join(m.upstreams)} (strategy {m.strategy or settings.default_strategy})")
    return 0


def cmd_spend(ns: argparse.Namespace) -> int:
    """GET /admin/spend from a running gateway and print it (a table, or the JSON with --json)."""
    import json
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    key = ns.admin_key or os.environ.get("GATEWAY_ADMIN_KEY")
    if not key:
        print("an admin key is needed: --admin-key or GATEWAY_ADMIN_KEY", file=sys.stderr)
        return 2
    q = {"group_by": ns.group_by, **{k: v for k, v in (("from", ns.from_), ("to", ns.to)) if v}}
    req = urllib.request.Request(f"{ns.url.rstrip('/')}/admin/spend?{urllib.parse.urlencode(q)}",
                                 headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=ns.timeout) as r:
            data = json.load(r)
    except urllib.error.HTTPError as e:
        print(f"{e.code}: {e.read().decode(errors='replace')[:500]}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach {ns.url}: {e}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"spend by {data['group_by']} from {data['from']} to {data['to']} (UTC days)")
    print(f"{data['group_by']:<34} {'USD':>12} {'requests':>9} {'input tok':>11} {'output tok':>11}")
    total = 0.0
    for name, row in data["totals"].items():
        label = f"{name} ({row['name']})" if row.get("name") else name
        print(f"{label[:34]:<34} {row['usd']:>12.6f} {row['requests']:>9} {row['input_tokens']:>11} {row['output_tokens']:>11}")
        total += row["usd"]
    print(f"{'total':<34} {total:>12.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # bench, cpu-ab and top own their flags; argparse.REMAINDER mishandles a leading option, so hand them over first.
    if argv[:1] == ["bench"]:
        from gateway.tools.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["cpu-ab"]:
        from gateway.tools.cpu_ab import main as cpu_ab_main

        return cpu_ab_main(argv[1:])
    if argv[:1] == ["top"]:
        from gateway.tools.top import main as top_main

        return top_main(argv[1:])
    ns = build_parser().parse_args(argv)
    return ns.fn(ns) or 0


def build_parser() -> argparse.ArgumentParser:
    """Every flag has a help text (tests/e2e/test_cli.py checks it)."""
    parser = argparse.ArgumentParser(prog="gateway", description="LLM throughput gateway")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the gateway (settings from GATEWAY_* env)")
    p.add_argument("--host", help="address to listen on (default: GATEWAY_HOST or 0.0.0.0)")
    p.add_argument("--port", type=int, help="port to listen on (default: GATEWAY_PORT or 8080)")
    p.add_argument("--config", help="fleet YAML (default: GATEWAY_CONFIG or the embedded demo fleet)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes sharing the port (SO_REUSEPORT) and Redis (default: the usable cores with "
                        "GATEWAY_REDIS_URL set, else 1)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="simulated 3-upstream fleet + gateway (what `make run` starts)")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    p.add_argument("--sim-port", type=int, default=9101, help="first of the three simulator ports")
    p.set_defaults(fn=cmd_demo)

    from gateway.sim.server import add_sim_arguments

    p = sub.add_parser("sim", help="run a simulated upstream (GPU server or hosted API)")
    add_sim_arguments(p)
    p.set_defaults(fn=cmd_sim)

    p = sub.add_parser("check-config", help="validate a fleet YAML")
    p.add_argument("path", nargs="?", help="fleet YAML to check (default: GATEWAY_CONFIG or the embedded demo fleet)")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("spend", help="spend report of a running gateway (GET /admin/spend)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway's base URL (default %(default)s)")
    p.add_argument("--admin-key", help="admin key (default: the GATEWAY_ADMIN_KEY environment variable)")
    p.add_argument("--group-by", choices=("key", "model", "upstream"), default="key", help="group spend by (default %(default)s)")
    p.add_argument("--from", dest="from_", metavar="YYYY-MM-DD", help="first UTC day (default: 6 days ago)")
    p.add_argument("--to", metavar="YYYY-MM-DD", help="last UTC day (default: today)")
    p.add_argument("--json", action="store_true", help="print the JSON report (per-day buckets) instead of a table")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway (default %(default)s)")
    p.set_defaults(fn=cmd_spend)

    sub.add_parser("bench", help="throughput benchmark on a simulated heterogeneous fleet (gateway bench --help)")
    sub.add_parser("cpu-ab", help="paired CPU-per-request A/B of two source trees (gateway cpu-ab --help)")
    sub.add_parser("top", help="live terminal view of a running gateway (gateway top --help)")
    return parser

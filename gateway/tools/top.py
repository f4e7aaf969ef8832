"""``gateway top``: a live terminal view of the fleet (GET /v1/gateway/upstreams).

    gateway top --url http://127.0.0.1:8080 --interval 1
    gateway top --once            # one frame, exit 0 (scripts, tests)

Exit codes: 0 on success / Ctrl-C, 2 when the gateway cannot be read (unreachable,
HTTP error, unauthorized, not JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

ENDPOINT = "/v1/gateway/upstreams"
BATCHES = "/v1/gateway/batches"

_CLEAR = "\x1b[H\x1b[2J\x1b[3J"
_RESET = "\x1b[0m"
_STATE_COLORS = {"healthy": "\x1b[32m", "ejected": "\x1b[31m", "cooldown": "\x1b[33m", "draining": "\x1b[33m"}
_REDIS_COLORS = {"ok": "\x1b[32m", "degraded": "\x1b[33m", "disabled": "\x1b[90m"}


class FetchError(Exception):
    """The gateway could not be read; the message says why."""


def fetch_snapshot(url: str, *, admin_key: str | None = None, timeout: float = 5.0, endpoint: str = ENDPOINT) -> dict[str, Any]:
    full = url.rstrip("/") + endpoint
    headers = {"Accept": "application/json", "User-Agent": "gateway-top"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
        headers["X-Admin-Key"] = admin_key
    req = urllib.request.Request(full, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise FetchError(f"{full}: HTTP {exc.code} unauthorized (pass --admin-key or set GATEWAY_ADMIN_KEY)") from exc
        raise FetchError(f"{full}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot reach gateway at {full}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, bad URL
        raise FetchError(f"cannot reach gateway at {full}: {exc}") from exc
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise FetchError(f"{full}: response is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FetchError(f"{full}: unexpected response (not a JSON object)")
    return data


# ---- formatting ------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def fmt_rate(v: Any) -> str:
    f = _num(v)
    if f is None:
        return "-"
    if abs(f) >= 1000:
        return f"{f:.0f}"
    if abs(f) >= 10:
        return f"{f:.1f}"
    return f"{f:.2f}"


def fmt_int(v: Any) -> str:
    f = _num(v)
    return "-" if f is None else f"{f:.0f}"


def fmt_ms(seconds: Any) -> str:
    f = _num(seconds)
    if f is None:
        return "-"
    ms = f * 1000
    if ms >= 10000:
        return f"{ms / 1000:.1f}s"
    if ms >= 10:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"


_COLUMNS = (
    # header, align ("<" left / ">" right)
    ("NAME", "<"), ("PROVIDER", "<"), ("KIND", "<"), ("STATE", "<"), ("WEIGHT", ">"),
    ("INFLIGHT", ">"), ("TOK/S", ">"), ("TTFT", ">"), ("DECODE", ">"), ("CAPACITY", ">"),
    ("SAT%", ">"), ("$/1M OUT", ">"), ("ERR/M", ">"), ("429/M", ">"), ("EJ", ">"), ("HIT%", ">"),
)


def fmt_usd(v: Any) -> str:
    """USD per 1M tokens: cents when small, whole dollars when large; '-' when unknown (e.g. an idle GPU)."""
    x = _num(v)
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _row(u: dict[str, Any]) -> list[str]:
    cap: dict[str, Any] = u["capacity"] if isinstance(u.get("capacity"), dict) else {}
    sat = _num(cap.get("saturation_tok_s"))
    toks = _num(u.get("tok_s"))
    sat_pct = f"{100 * toks / sat:.0f}%" if sat and toks is not None else "-"
    inflight = fmt_int(u.get("inflight"))
    if _num(u.get("max_concurrency")) is not None:
        inflight += "/" + fmt_int(u.get("max_concurrency"))
    weight = _num(u.get("weight"))
    return [
        str(u.get("name", "?")),
        str(u.get("provider") or "-"),
        str(u.get("kind") or "-"),
        str(u.get("state") or "?"),
        "-" if weight is None else f"{weight:.2f}",
        inflight,
        fmt_rate(u.get("tok_s")),
        fmt_ms(u.get("ttft_s")),
        fmt_rate(u.get("decode_tok_s")),
        "learning" if sat is None else fmt_rate(sat),
        sat_pct,
        fmt_usd(u.get("usd_per_1m_output")),
        fmt_rate(u.get("errors_per_min")),
        fmt_rate(u.get("rate_limited_per_min")),
        fmt_int(u.get("ejections")),
        _hit(u.get("cache")),
    ]


def with_batches(snap: dict[str, Any], url: str, admin_key: str | None, timeout: float) -> dict[str, Any]:
    """Add the batch progress summary to the snapshot (absent when the gateway runs no batch API)."""
    try:
        batches = fetch_snapshot(url, admin_key=admin_key, timeout=timeout, endpoint=BATCHES).get("batches")
    except FetchError:
        return snap
    if batches:
        snap["batches"] = batches
    return snap


def _batch_lines(batches: Any) -> list[str]:
    if not isinstance(batches, list) or not batches:
        return []
    out = ["", "batches: id  status  done/total  failed  pending  tok/s  ETA"]
    for b in batches:
        if isinstance(b, dict):
            eta = _num(b.get("eta_seconds"))
            out.append(f"  {b.get('id')}  {b.get('status')}  {fmt_int(b.get('completed'))}/{fmt_int(b.get('total'))}  "
                       f"{fmt_int(b.get('failed'))}  {fmt_int(b.get('pending'))}  {fmt_rate(b.get('tokens_per_second'))}  "
                       f"{'-' if eta is None else f'{eta:.0f}s'}")
    return out


def _hit(cache: Any) -> str:
    """Prefix-cache hit rate (prompt tokens reported cached / prompt tokens; routing/affinity.py), "-" when unknown."""
    v = _num(cache.get("hit_rate")) if isinstance(cache, dict) else None
    return "-" if v is None else f"{100 * v:.0f}%"


def render(snap: dict[str, Any], *, url: str = "", color: bool = False, width: int | None = None) -> str:
    """One frame of the view as text (no screen clearing)."""
    ups = [u for u in (snap.get("upstreams") or []) if isinstance(u, dict)]
    redis = str(snap.get("redis") or "?")
    ts = _num(snap.get("time"))
    when = time.strftime("%H:%M:%S", time.localtime(ts)) if ts is not None else "-"
    tot_toks = sum(_num(u.get("tok_s")) or 0.0 for u in ups)
    tot_inflight = sum(_num(u.get("inflight")) or 0.0 for u in ups)
    queues: dict[str, Any] = snap["queue_depth"] if isinstance(snap.get("queue_depth"), dict) else {}
    redis_s = f"{_REDIS_COLORS.get(redis, '')}{redis}{_RESET}" if color else redis

    raw_cost = snap.get("cost")
    cost: dict[str, Any] = raw_cost if isinstance(raw_cost, dict) else {}
    lines = [
        "  ".join(x for x in ("gateway top", url, f"replica {snap.get('replica', '-')}", f"redis {redis_s}", f"at {when}") if x),
        f"fleet: {fmt_rate(tot_toks)} tok/s  ${fmt_usd(cost.get('fleet_usd_per_1m_output'))}/1M out  "
        f"{fmt_int(tot_inflight)} in flight  "
        f"{len(ups)} upstream(s)  queued: "
        + (", ".join(f"{m}={fmt_int(d)}" for m, d in sorted(queues.items())) or "-"),
        "",
    ]
    rows = [_row(u) for u in ups]
    headers = [h for h, _ in _COLUMNS]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells: list[str], state: str | None = None) -> str:
        out = []
        for i, (cell, (_, align)) in enumerate(zip(cells, _COLUMNS)):
            txt = f"{cell:{align}{widths[i]}}"
            if color and state is not None and i == 3 and state in _STATE_COLORS:
                txt = f"{_STATE_COLORS[state]}{txt}{_RESET}"
            out.append(txt)
        return "  ".join(out).rstrip()

    head = fmt(headers)
    lines.append(f"\x1b[1m{head}{_RESET}" if color else head)
    for u, r in zip(ups, rows):
        lines.append(fmt(r, str(u.get("state") or "")))
    if not rows:
        lines.append("(no upstreams)")
    lines += _slo_lines(snap.get("slo"))
    lines += _class_cost_lines(cost)
    lines += _batch_lines(snap.get("batches"))
    if width:
        # keep the frame from wrapping on narrow terminals (color codes are only on
        # short lines' prefix/suffix, so cut plain lines only)
        lines = [ln if "\x1b" in ln or len(ln) <= width else ln[:width] for ln in lines]
    return "\n".join(lines) + "\n"


def _slo_lines(slo: Any) -> list[str]:
    """Service classes: per pool and class, the last window's requests, SLO attainment, tok/s and goodput."""
    classes = slo.get("classes") if isinstance(slo, dict) else None
    if not classes:
        return []
    out = ["", f"service classes (last {fmt_int(slo.get('window_s'))} s): model/class  requests  attainment  tok/s  goodput"]
    for model, by_class in sorted(classes.items()):
        for cls, f in sorted(by_class.items()):
            att = _num(f.get("attainment"))
            out.append(f"  {model}/{cls}  {fmt_int(f.get('requests'))}  {'-' if att is None else f'{100 * att:.1f}%'}  "
                       f"{fmt_rate(f.get('tok_s'))}  {fmt_rate(f.get('goodput_tok_s'))}")
    return out


def _class_cost_lines(cost: dict[str, Any]) -> list[str]:
    """Cost per service class (this replica): live $/1M output tokens over the class-cost window, spend since start."""
    classes = cost.get("classes")
    if not isinstance(classes, dict) or not classes:
        return []
    out = ["", f"class cost (this replica; $/1M over the last {fmt_int(cost.get('classes_window_s'))} s): "
               "model/class  $/1M out  spent  output tokens"]
    for model, by_class in sorted(classes.items()):
        for cls, f in sorted(by_class.items() if isinstance(by_class, dict) else ()):
            spent = _num(f.get("spend_usd"))
            out.append(f"  {model}/{cls}  ${fmt_usd(f.get('usd_per_1m_output'))}  "
                       f"{'-' if spent is None else f'${spent:.4f}'}  {fmt_int(f.get('output_tokens'))}")
    return out


# ---- main ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway top", description="Live view of the gateway's upstreams.")
    p.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                   help="gateway base URL (default: $GATEWAY_URL or http://127.0.0.1:8080)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--admin-key", default=os.environ.get("GATEWAY_ADMIN_KEY") or None,
                   help="admin API key (default: $GATEWAY_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", help="with --once: print the raw snapshot JSON")
    p.add_argument("--no-color", action="store_true", help="no ANSI colors")
    return p


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    interval = max(0.1, args.interval)
    timeout = max(2.0, min(10.0, interval * 3))
    tty = hasattr(out, "isatty") and out.isatty()
    color = tty and not args.no_color and not os.environ.get("NO_COLOR")

    try:
        snap = with_batches(fetch_snapshot(args.url, admin_key=args.admin_key, timeout=timeout), args.url, args.admin_key, timeout)
    except FetchError as exc:
        print(f"gateway top: {exc}", file=sys.stderr)
        return 2

    if args.once:
        if args.json:
            out.write(json.dumps(snap, indent=2) + "\n")
        else:
            out.write(render(snap, url=args.url, color=color))
        out.flush()
        return 0

    try:
        error: str | None = None
        while True:
            width = shutil.get_terminal_size((160, 40)).columns if tty else None
            frame = render(snap, url=args.url, color=color, width=width)
            if error:
                red, reset = ("\x1b[31m", _RESET) if color else ("", "")
                frame += f"\n{red}connection lost: {error} (retrying){reset}\n"
            out.write((_CLEAR if tty else "") + frame + ("" if tty else "\n"))
            out.flush()
            time.sleep(interval)
            try:
                snap = with_batches(fetch_snapshot(args.url, admin_key=args.admin_key, timeout=timeout), args.url,
                                    args.admin_key, timeout)
                error = None
            except FetchError as exc:
                error = str(exc)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0


if __name__ == "__main__":  # python -m gateway.tools.top
    raise SystemExit(main())

#!/usr/bin/env python3
"""Container health probe (python:slim has no curl/wget).

Usage: healthcheck [URL]
Default URL: http://127.0.0.1:$GATEWAY_PORT/healthz. Exits 0 on any 2xx, 1 otherwise.
"""

import os
import sys
import urllib.request


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - local probe
            return 0 if 200 <= resp.status < 300 else 1
    except Exception as exc:  # HTTPError (non-2xx), URLError, timeout
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

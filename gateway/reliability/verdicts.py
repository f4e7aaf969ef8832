"""Hook subscriber: turns each attempt's outcome into a health verdict for outlier detection and into cooldowns.

- success: the upstream answered (also when it rightly refused the request itself, 4xx);
- failure: the upstream is to blame (connect error, timeout, 5xx, broken or invalid stream);
- no verdict: the attempt never reached the upstream, the client left, or the upstream was only busy (429): a
  half-open probe slot it held is freed so another probe can go.
A 429, or a 503/529 with Retry-After, also cools the upstream down on every replica for that long.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.errors import ClientDisconnected, UpstreamRateLimited, UpstreamStatusError

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.hooks import Attempt
    from gateway.reliability.outlier import OutlierDetector
    from gateway.sync.fleet_sync import FleetSync


class Verdicts:
    def __init__(self, detector: OutlierDetector, sync: FleetSync) -> None:
        self.detector = detector
        self.sync = sync

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        u, err = a.upstream, a.error
        if err is None:
            self.detector.success(u, a.t0)  # t0: outcomes of attempts older than an ejection are ignored
            return
        if isinstance(err, (UpstreamRateLimited, UpstreamStatusError)) and err.retry_after:
            self.sync.set_cooldown(u.name, time.time() + err.retry_after)
        if err.blames_upstream:
            self.detector.failure(u, a.t0)  # t0: failures of attempts in flight together count once
        elif a.contacted and not isinstance(err, (UpstreamRateLimited, ClientDisconnected)):
            self.detector.success(u, a.t0)  # it answered: the request itself was refused or too large
        else:
            self.detector.abandoned(u)

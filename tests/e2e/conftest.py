"""Every test here reports its pending asyncio tasks shortly before pytest-timeout would kill it."""

from tests.hangs import report_hangs  # noqa: F401  (autouse)

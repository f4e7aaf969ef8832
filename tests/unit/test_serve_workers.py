"""`gateway serve --workers` default."""

from __future__ import annotations

import os

from gateway.cli import usable_cores


def test_serve_defaults_to_the_usable_cores():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)

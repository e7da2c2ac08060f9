"""Shared e2e fixtures: the reference device provisioned through the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def token_device(tmp_path: Path, provision_token: Callable[..., Path]) -> Path:
    """The fingerprint token: keys, device, trust anchors (developer, vendor), board + policy, locked
    (``secured``), four signed packages installed."""
    return provision_token(tmp_path, lock=True)

"""``ism demo`` end to end: the two-command quick start's main job, run as a user runs it.

Builds the examples from source into a temporary directory (``examples/build.py``), runs
``ism demo`` in a real process and checks each act of the story happened — not the exact text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ISM = Path(sys.executable).with_name("ism")


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    subprocess.run([sys.executable, str(ROOT / "examples" / "build.py"), str(examples)], check=True, cwd=ROOT)
    done = subprocess.run(
        [str(ISM), "demo", "--examples", str(examples), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for act in (
        "lifecycle entry 1",  # locked at the factory
        "applied provisioning bundle",  # provisioned in the field
        "[204 command.signer]",  # the bundle is not replayed: its signer was rotated out
        "[200 lifecycle.locked]",  # no anchors outside bundles once secured
        "[203 policy.rollback]",  # the older policy is refused
        "signature VERIFIES with the device 2FA key",  # the token works
        "quarantined",  # the misbehaving microservice is stopped
        "lifecycle        secured (0x3000)",  # the token's lifecycle claim
        "rule package.payload-digest",  # a flipped byte is refused at boot
        "is banned",  # the store's ban
        "[200 ms-lifecycle.banned]",  # and a banned microservice cannot come back
        "demo finished",
    ):
        assert act in out or act in done.stderr, f"demo did not show: {act}"
    assert "Traceback" not in out + done.stderr

"""requirements.lock records the environment the book was last built and tested with."""

from __future__ import annotations

import platform
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def read_lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


@pytest.mark.skipif(f"{platform.system()} {platform.machine()}" != "Linux x86_64",
                    reason="requirements.lock pins Linux x86_64 wheels; make env ignores it elsewhere")
def test_the_lock_pins_exactly_what_this_environment_runs():
    closure = runpy.run_path(str(ROOT / "scripts" / "lock.py"))["closure"]
    installed = closure()
    assert "torch" in installed and "pytest" in installed and "jupyterlab" in installed
    stale = {k: (v, installed.get(k)) for k, v in read_lock().items() if installed.get(k) != v}
    missing = sorted(set(installed) - set(read_lock()))
    assert not stale and not missing, (
        f"requirements.lock is out of date (pinned vs installed: {stale}; not pinned: {missing}); run `make lock`")

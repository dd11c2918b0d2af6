"""`make env` installs with uv (fast) and falls back to pip where uv fails; INSTALLER=pip never calls uv.

The Makefile's recipe runs for real here, against a venv whose `python` and `uv` are scripts that record their
arguments: nothing is installed, and the test needs no network.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_venv(tmp_path: Path, uv_exit: int | None) -> tuple[Path, Path]:
    """A venv folder whose python logs every call (and succeeds); with ``uv_exit``, a uv that logs and exits so."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "python", f'echo "python $*" >> {log}\n')
    if uv_exit is not None:
        _script(venv / "bin" / "uv", f'echo "uv $*" >> {log}\nexit {uv_exit}\n')
    return venv, log


def _make_env(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # the recipe as a user's shell runs it: no outer make's flags, no INSTALLER of the caller's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS")) and k != "INSTALLER"}
    return subprocess.run(["make", "--no-print-directory", "env", f"VENV={venv}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_failing_uv_is_said_and_every_install_is_done_again_by_pip(tmp_path):
    venv, log = _fake_venv(tmp_path, uv_exit=1)
    done = _make_env(venv)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert "python -m pip install -q uv>=0.4" in calls  # uv comes into the venv through pip
    editable = calls.index("uv pip install --python " + f"{venv}/bin/python --compile-bytecode -e .[dev,lab]")
    assert calls[editable + 1] == "python -m pip install -e .[dev,lab]"
    if platform.system() == "Linux" and platform.machine() == "x86_64":  # the lock's platform
        locked = calls.index(f"uv pip install --python {venv}/bin/python --compile-bytecode -r {venv}/requirements.lock")
        assert calls[locked + 1] == f"python -m pip install -r {venv}/requirements.lock"
    assert done.stdout.count("make env: uv could not install") == len([c for c in calls if c.startswith("uv ")])
    assert (venv / ".installed").exists()


def test_uv_installs_alone_when_it_works(tmp_path):
    venv, log = _fake_venv(tmp_path, uv_exit=0)
    assert _make_env(venv).returncode == 0
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("python -m pip install") and "uv" not in c]
    assert any(c.endswith("--compile-bytecode -e .[dev,lab]") for c in calls if c.startswith("uv pip install"))


def test_installer_pip_never_calls_uv_and_a_wrong_installer_is_named(tmp_path):
    venv, log = _fake_venv(tmp_path, uv_exit=0)  # a uv in the venv, which INSTALLER=pip must leave alone
    assert _make_env(venv, "INSTALLER=pip").returncode == 0
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("uv ")]
    assert "python -m pip install --upgrade pip" in calls and "python -m pip install -e .[dev,lab]" in calls
    wrong = _make_env(tmp_path / "other", "INSTALLER=conda")
    assert wrong.returncode != 0 and "INSTALLER=conda is not valid: uv or pip" in wrong.stderr

"""How long each chapter took, where: a timing record per executed notebook, and the committed record of
the ``tiny`` timings that the teacher's page reads.

Every notebook the runner executes leaves ``<reports>/timings/<notebook>.<profile>.json``: its wall time,
its CPU time (``cpu_s``: user plus system seconds of the kernel and every process it started and waited for,
such as its worker pools; ``None`` where the system cannot say, see :class:`Stopwatch`), the profile, the
machine (CPU model, cores), the load average before and after (other work on the machine slows a run down)
and whether the data cache was *cold* (the run wrote something into the data
cache: pretraining, experts, sweeps computed for the first time) or *warm* (it only read it).

``python -m mergelab.report.timings --reports DIR [--profile tiny] [--out reports/timings-tiny.json]``
gathers the records of a run into the committed record (:data:`RECORD`), which the teacher's page
(:mod:`mergelab.report.teaching`) turns into its table of session times; ``--executed NB.ipynb ...``
adds notebooks executed before timing records existed, from their papermill duration (load and cache
state unknown, and said so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab import paths

from ..utils import atomic_write_text

TIMINGS_DIR = "timings"
RECORD = "timings-tiny.json"
"""The committed record of the ``tiny`` timings, next to ``reports/_quarto.yml``."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers restrict), at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, usable or 1)


def machine() -> dict[str, Any]:
    """``{cpu_model, cores, cores_usable, system}``: what a timing was measured on."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable_cores(),
            "system": f"{platform.system()} {platform.machine()}"}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or ``None`` where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cache_snapshot(data_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """``{relative path: (size in bytes, mtime in ns)}`` of every file in the data cache."""
    root = Path(data_dir) if data_dir is not None else paths.data_dir()
    out: dict[str, tuple[int, int]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:  # removed meanwhile (an atomic write's temporary file)
                continue
            out[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return out


_REAPED = threading.Lock()
"""Held while a child is reaped through :func:`run_child` and while a :class:`Stopwatch` reads the CPU time of
this process's children, so that a chapter beside the lanes never counts a lane that ended meanwhile."""
_reaped = {"cpu_s": 0.0, "unmeasured": 0}
"""CPU seconds of the children :func:`run_child` reaped (and how many it reaped without measuring them)."""


def _children_cpu() -> float | None:
    """User plus system CPU seconds of this process's children that ended and were waited for (``None``
    where the system has no ``resource`` module)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_reading() -> tuple[float | None, float, int]:
    with _REAPED:
        return _children_cpu(), _reaped["cpu_s"], _reaped["unmeasured"]


def run_child(args: Sequence[str], **popen: Any) -> tuple[int, float | None]:
    """Run ``args`` like :func:`subprocess.run` (keyword arguments go to :class:`subprocess.Popen`); return its
    exit status and its CPU time (user plus system seconds, with every process it waited for: a lane and its
    kernel), or ``None`` where the system cannot say (no ``os.waitid``/``os.wait4``).

    The child is waited for without being reaped (``WNOWAIT``), then reaped under :data:`_REAPED`, so that a
    :class:`Stopwatch` of this process subtracts exactly the children reaped here while it ran. Interrupted
    (Ctrl-C), the child is killed and reaped, as :func:`subprocess.run` does."""
    proc = subprocess.Popen(list(args), **popen)
    measurable = hasattr(os, "waitid") and hasattr(os, "wait4")
    try:
        if not measurable:
            code = proc.wait()
            with _REAPED:
                _reaped["unmeasured"] += 1
            return code, None
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # blocks until it ends; leaves it to reap
        with _REAPED:
            _, status, usage = os.wait4(proc.pid, 0)
            cpu = usage.ru_utime + usage.ru_stime
            _reaped["cpu_s"] += cpu
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, cpu
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        raise


class Stopwatch:
    """Measure one notebook's run: ``with Stopwatch() as watch: ...`` then :meth:`record`.

    Its CPU time is what this process's children that ended meanwhile used (the notebook's kernel, and
    through it every worker process the kernel waited for), less the children :func:`run_child` reaped
    meanwhile (the lanes beside the first chapter). It is ``None`` where the system cannot say (no
    ``resource`` module, or a lane reaped unmeasured meanwhile). Processes a kernel leaves running, or that
    are killed rather than waited for, are not counted."""

    def __enter__(self) -> "Stopwatch":
        self.before = cache_snapshot()
        self.load_start = load_average()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cpu_start = _cpu_reading()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s = time.perf_counter() - self.start
        (c0, r0, u0), (c1, r1, u1) = self.cpu_start, _cpu_reading()
        self.cpu_s = None if c0 is None or c1 is None or u1 != u0 else max(0.0, (c1 - c0) - (r1 - r0))
        self.load_end = load_average()
        after = cache_snapshot()
        self.written = sorted(k for k, v in after.items() if self.before.get(k) != v)

    def record(self, notebook: str, profile: str) -> dict[str, Any]:
        """The timing record of the run (see the module docstring)."""
        return {"notebook": notebook, "profile": profile, "wall_s": round(self.wall_s, 1),
                "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 1), "started_utc": self.started,
                "machine": machine(), "load_average_start": self.load_start, "load_average_end": self.load_end,
                "cache": "cold" if self.written else "warm", "cache_files_written": len(self.written)}


def cpu_text(record: dict[str, Any]) -> str:
    """``", 123 CPU s"`` for a record that has its CPU time, else ``""``: for the lines that report a run."""
    cpu = record.get("cpu_s")
    return "" if cpu is None else f", {cpu:.0f} CPU s"


def write_timing(reports: Path, record: dict[str, Any]) -> Path:
    """Write ``<reports>/timings/<notebook>.<profile>.json`` (atomically); return its path."""
    path = Path(reports) / TIMINGS_DIR / f"{record['notebook']}.{record['profile']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def collect(reports: Path, profile: str = "tiny") -> list[dict[str, Any]]:
    """Every timing record of ``profile`` in ``<reports>/timings``, by notebook name."""
    folder = Path(reports) / TIMINGS_DIR
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(f"*.{profile}.json"))]


def read_record(path: Path) -> dict[str, Any] | None:
    """The committed record (``{"profile", "chapters": [...]}``), or ``None`` when there is none."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def from_executed(notebook: Path) -> dict[str, Any]:
    """A timing record made from an executed notebook's papermill metadata (its ``duration`` and
    ``start_time``), for runs made before the runner kept timing records: the machine is this one (the
    notebook does not say), the load average and the cache state were not recorded (``None``, ``"unknown"``)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    meta = nb.metadata.get("papermill") or {}
    if meta.get("duration") is None or not meta.get("start_time"):
        raise ValueError(f"{notebook} has no papermill duration: it was not executed by papermill to the end")
    profile = (meta.get("parameters") or {}).get("profile", "?")
    return {"notebook": Path(notebook).stem, "profile": profile, "wall_s": round(float(meta["duration"]), 1),
            "started_utc": str(meta["start_time"])[:19] + "Z", "machine": machine(), "load_average_start": None,
            "load_average_end": None, "cache": "unknown", "cache_files_written": None,
            "source": f"papermill duration of {notebook} (executed before timing records existed)"}


def write_record(reports: Path | None, out: Path, profile: str = "tiny", note: str = "",
                 executed: Sequence[Path] = ()) -> Path:
    """Gather the timing records of a run in ``reports`` (and of ``executed`` notebooks, see
    :func:`from_executed`) into ``out`` (the committed record); refuse an empty run. Chapters already in
    ``out`` and not in this run are kept; the runner's records win over executed notebooks'."""
    records = [r for r in (from_executed(p) for p in executed) if r["profile"] == profile]
    records += collect(reports, profile) if reports is not None else []
    if not records:
        raise ValueError(f"no timing records of profile {profile!r} in {Path(reports) / TIMINGS_DIR}: run "
                         f"`make report PROFILE={profile} REPORTS={reports} FORCE=1` first")
    old = read_record(out) or {}
    chapters = {c["notebook"]: c for c in old.get("chapters", [])}
    chapters.update({r["notebook"]: r for r in records})
    body = {"profile": profile, "note": note or old.get("note", ""),
            "chapters": [chapters[k] for k in sorted(chapters)]}
    atomic_write_text(Path(out), json.dumps(body, indent=2) + "\n")
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergelab.report.timings",
        description="Gather the timing records a run of `make report` left in <reports>/timings/ into the committed "
                    "record of a profile's chapter times (reports/timings-tiny.json), which the teacher's page reads.")
    parser.add_argument("--reports", type=Path, default=None, help="the reports folder of a run")
    parser.add_argument("--executed", type=Path, nargs="+", default=[], metavar="NOTEBOOK",
                        help="executed notebooks whose papermill duration to use where no timing record exists")
    parser.add_argument("--profile", default="tiny", help="the profile whose records to gather (default: tiny)")
    parser.add_argument("--out", type=Path, default=paths.project_root() / "reports" / RECORD,
                        help=f"the record to write (default: reports/{RECORD})")
    parser.add_argument("--note", default="", help="a sentence on the conditions of the run")
    args = parser.parse_args(argv)
    print(f"wrote {write_record(args.reports, args.out, args.profile, args.note, args.executed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

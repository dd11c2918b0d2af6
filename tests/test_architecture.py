"""The package's layering (docs/architecture.md), checked by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """Merge methods never import evaluation or benchmarks, analyses never import chapters, no cycles
    between layers: ``lint-imports`` exits 0 and reports every contract kept."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_no_module_is_over_500_lines_without_a_reason():
    """One idea per module: a module over 500 lines must be listed here with why."""
    allowed = {
        "benchmarks/clip/benchmark.py": "the clip benchmark's data loading, head and evaluation caches (its "
                                        "configuration is in config.py, its fine-tuning loop in training.py)",
    }
    over = {}
    for path in sorted((ROOT / "src" / "mergelab").rglob("*.py")):
        rel = path.relative_to(ROOT / "src" / "mergelab").as_posix()
        lines = len(path.read_text().splitlines())
        if lines > 500 and rel not in allowed:
            over[rel] = lines
    assert not over, f"modules over 500 lines: {over}; split them or say why in this test"


def test_the_report_runner_and_course_tools_start_without_torch():
    """`make report`, its kernels' `mergelab.paths` and `make student` load no torch, open_clip or
    torchvision (3-4 s of CPU per process, paid by every command and every throwaway test notebook);
    the package's entry points stay importable from `mergelab` on first use."""
    code = ("import sys, mergelab.paths, mergelab.params, mergelab.report, mergelab.course\n"
            "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
            "import mergelab\n"
            "assert callable(mergelab.merge) and mergelab.TaskVector.__name__ == 'TaskVector'\n"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"


@pytest.mark.parametrize("entry", ["mergelab.report", "mergelab.report.lanes", "mergelab.course"])
def test_the_command_line_processes_load_nbformat_without_the_iri_grammar_and_still_validate(entry):
    """The runner, a lane and the course tools call `mergelab.startup.skip_iri_grammar` before anything imports
    nbformat: papermill and nbformat then load without `rfc3987_syntax` (2.5 s of CPU a process), and nbformat still
    validates a chapter and refuses a broken one."""
    code = (f"import sys, {entry} as entry\n"
            "try:\n"
            "    entry.main([str(__import__('pathlib').Path('no-such-spec.json'))] if entry.__name__.endswith('lanes') else ['--help'])\n"
            "except (SystemExit, FileNotFoundError):\n"
            "    pass\n"
            "import papermill, nbformat\n"
            "print(sys.modules.get('rfc3987_syntax', 'absent') is None)\n"
            "nb = nbformat.read('notebooks/04_mass_routing.ipynb', as_version=4)\n"
            "nbformat.validate(nb)\n"
            "nb.cells[0]['cell_type'] = 'not a cell type'\n"
            "try:\n"
            "    nbformat.validate(nb)\n"
            "except nbformat.ValidationError:\n"
            "    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["True", "refused"], done.stdout  # after --help's text


def test_skipping_the_iri_grammar_leaves_a_process_that_already_has_jsonschema_alone():
    code = ("import sys, jsonschema\n"
            "from mergelab.startup import skip_iri_grammar\n"
            "before = sys.modules.get('rfc3987_syntax', 'absent')\n"
            "print(skip_iri_grammar(), sys.modules.get('rfc3987_syntax', 'absent') is before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]

"""The committed chapters stay clean whatever a user does in JupyterLab.

Two guards, one list of what is stripped (:data:`EXTRA_KEYS`, on top of nbstripout's outputs,
execution counts and cell ids):

* ``make env`` installs nbstripout as a git filter (:func:`install_git_filter`, run through
  :mod:`mergelab.nbfilter`), so outputs and kernel metadata never reach git, whoever writes the notebook;
* ``make lab`` starts JupyterLab with :func:`strip_on_save` as the contents manager's pre-save hook,
  so a chapter of ``notebooks/`` run in JupyterLab is saved exactly as committed: ``git status``
  shows it unchanged. The outputs stay in the browser while the session lasts; the executed chapters
  with their outputs are the book's (``make report``). Notebooks elsewhere are saved as they are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import paths

EXTRA_KEYS = ("metadata.language_info", "metadata.widgets", "metadata.signature", "cell.metadata.execution",
              "cell.metadata.collapsed", "cell.metadata.ExecuteTime", "cell.metadata.heading_collapsed",
              "cell.metadata.hidden", "cell.metadata.scrolled")
"""Metadata nbstripout removes besides outputs, execution counts and ids (JupyterLab adds these)."""


def strip(nb: Any) -> Any:
    """``nb`` (an ``nbformat`` notebook) as it is committed: what the git filter stores."""
    from nbstripout import strip_output

    return strip_output(nb, keep_output=False, keep_count=False, keep_id=False, extra_keys=list(EXTRA_KEYS))


def strip_on_save(model: dict[str, Any], path: str, contents_manager: Any, **kwargs: Any) -> None:
    """Jupyter server pre-save hook: a notebook under the project's ``notebooks/`` is saved stripped."""
    import nbformat

    if model.get("type") != "notebook" or not model.get("content"):
        return
    root = Path(getattr(contents_manager, "root_dir", ".")).resolve()
    target = (root / path.lstrip("/")).resolve()
    if paths.notebooks_dir().resolve() not in target.parents:
        return
    model["content"] = strip(nbformat.from_dict(model["content"]))


def install_git_filter() -> str:
    """Configure the git checkout of the working directory to strip notebooks with nbstripout (what
    ``make env`` runs in the project)."""
    from .nbfilter import COMMAND_MODULE

    subprocess.run([sys.executable, "-m", "nbstripout", "--install"], check=True)
    # the same nbstripout, started 3 s faster a notebook (mergelab.nbfilter): git runs it for every notebook it stages
    subprocess.run(["git", "config", "filter.nbstripout.clean", f'"{sys.executable}" -m {COMMAND_MODULE}'], check=True)
    subprocess.run(["git", "config", "filter.nbstripout.extrakeys", " ".join(EXTRA_KEYS)], check=True)
    # Record the files' stat data in the index now. In a fresh clone, files checked out in the second the index was
    # written are "racily clean": every `git status` would compare their contents, through the filter for notebooks
    # (about 12 CPU s for the seven chapters), and each chapter runs one for its provenance (notebook.git_commit).
    subprocess.run(["git", "update-index", "-q", "--refresh"], check=False, capture_output=True)
    return "git filter: notebooks are stripped of outputs and kernel metadata when staged (nbstripout)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergelab.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--install-git-filter", action="store_true", help="install nbstripout as a git filter")
    args = parser.parse_args(argv)
    if args.install_git_filter:
        print(install_git_filter())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

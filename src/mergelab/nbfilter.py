"""The notebooks' git clean filter: nbstripout, started without rfc3987-syntax's IRI grammar.

git runs the clean filter once for every notebook it stages, diffs or re-checks (``git add``, ``git diff``, a
``git status`` that finds a stale index entry). nbstripout's own ``python -m nbstripout`` imports nbformat, whose
``jsonschema`` builds that grammar on import (:mod:`mergelab.startup`): about 3 s of each run's 3.6 on the 2-core
development machine, 0.5 s without it. ``python -m mergelab.nbfilter ARGS`` runs the same nbstripout with the same
arguments after :func:`mergelab.startup.skip_iri_grammar`; ``make env`` (:func:`mergelab.lab.install_git_filter`)
configures git's ``filter.nbstripout.clean`` to call it.
"""

from __future__ import annotations

import runpy
import sys

from .startup import skip_iri_grammar

COMMAND_MODULE = "mergelab.nbfilter"
"""The module git's clean filter runs (``python -m``)."""


def main() -> None:
    """Run ``python -m nbstripout`` with this process's arguments, stdin and stdout, without the IRI grammar."""
    skip_iri_grammar()
    sys.argv[0] = "nbstripout"
    runpy.run_module("nbstripout", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""Start-up of mergelab's own command-line processes (the report runner and its lanes, the course tools).

These processes read and write notebooks with ``nbformat`` (through papermill), whose import loads ``jsonschema``.
When the optional package ``rfc3987-syntax`` is installed (it is, through ``jsonschema[format-nongpl]``, which
JupyterLab's ``jupyter-events`` requires), ``jsonschema`` imports it at once, and it builds its IRI grammar, some 35
Lark Earley parsers, at import: about 2.5 s of CPU per process on the 2-core development machine, against 1 s for all
the rest the runner imports (upstream: python-jsonschema/jsonschema issue 1428). It only serves ``jsonschema``'s
``iri`` and ``iri-reference`` format checks, which no notebook schema uses and nothing in these processes asks for.
:func:`skip_iri_grammar` tells Python that the package is absent in the calling process, so ``jsonschema`` goes
without those two checks there. It is called by the processes' entry points only, never on import of a mergelab
module, so a user's own process (JupyterLab, a kernel, a script importing mergelab) keeps every check it has.
"""

from __future__ import annotations

import sys

IRI_GRAMMAR_MODULE = "rfc3987_syntax"


def skip_iri_grammar() -> bool:
    """Make ``import rfc3987_syntax`` fail in this process (``sys.modules`` entry ``None``), so that ``jsonschema``,
    imported afterwards, skips its IRI format checks instead of building their grammar. Returns whether it took
    effect: not when ``jsonschema`` or the package itself is already imported (their checks stay as they are)."""
    if "jsonschema" in sys.modules or IRI_GRAMMAR_MODULE in sys.modules:
        return False
    sys.modules[IRI_GRAMMAR_MODULE] = None  # type: ignore[assignment]  # the import system's "not installed"
    return True


__all__ = ["IRI_GRAMMAR_MODULE", "skip_iri_grammar"]

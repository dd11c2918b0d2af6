"""The book's table of claims: every chapter's ``claims`` gathered from the results of the run.

Each executed chapter writes ``<reports>/results/<chapter>.json`` with a ``claims`` list
(``{claim, source, status, evidence}``). :func:`write_claims_page` turns them into one page of the
book, ``claims.qmd``, regenerated at every render, so that what the book says a size reproduces is
what the run measured, never typed in.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..params import ReportError
from ..utils import atomic_write_text, finite_or_none, to_jsonable

CLAIMS_PAGE = "claims.qmd"
"""The generated page, listed in ``book.chapters`` of ``reports/_quarto.yml`` after the index."""

STATUS_LABELS = {"reproduced": "reproduced", "not_reproduced": "**not reproduced**", "not_testable": "not testable"}


RECOMPUTED = {
    "00_benchmark_and_baselines": "mergelab.experiments.ch00_benchmark",
    "01_stability_bound": "mergelab.experiments.ch01_claims",
    "02_task_vectors_as_gradients": "mergelab.experiments.ch02_claims",
    "03_task_singular_vectors": "mergelab.experiments.ch03_tsv",
    "04_mass_routing": "mergelab.experiments.ch04_claims",
    "05_merge3_irt": "mergelab.experiments.ch05_claims",
    "06_cycle_consistent_merging": "mergelab.experiments.ch06_claims",
}
"""Each chapter's module, whose ``claims_from_results`` gives the chapter's claims again from the numbers
its results JSON stores (every chapter keeps there what its claims are judged on)."""


def check_claims(chapter: str, results: Mapping[str, Any]) -> str | None:
    """Check that the claims stored in a chapter's results are what the chapter's rule gives on the
    numbers stored beside them (chapters of :data:`RECOMPUTED`; claims compared in any order).

    A claim marked ``reproduced`` is then backed by evidence that was computed again, not only by a word
    in a file: results edited by hand, or whose claims an older rule judged, are refused.

    Returns:
        ``None`` when checked (or the chapter is not in :data:`RECOMPUTED`); a sentence saying why not
        when the rule cannot run on these results (results written before the chapter stored all its
        inputs): ``make report`` prints it as a warning rather than refusing a run it cannot judge.

    Raises:
        ReportError: naming the chapter, the first claim that differs, what is stored and what the rule
            gives, and how to run the chapter again.
    """
    module = RECOMPUTED.get(chapter)
    if module is None:
        return None
    import importlib

    rule = importlib.import_module(module).claims_from_results
    rerun = f"make report NOTEBOOKS={chapter} FORCE=1"
    try:
        again = finite_or_none(to_jsonable(rule(results)))
    except Exception as err:  # noqa: BLE001  (any failure of the rule on these results: not checked, said why)
        return (f"{chapter}: its claims were not checked against its numbers ({type(err).__name__}: {err}); "
                f"results written before the chapter stored every input of its claims? Run it again: {rerun}")
    stored = finite_or_none(list(results.get("claims") or []))
    def canonical(c: Mapping[str, Any]) -> str:  # compared in any order: a results file may list a mapping's keys
        return json.dumps(c, sort_keys=True)  # in another order, and some rules follow it
    mine, theirs = sorted(map(canonical, stored)), sorted(map(canonical, again))
    if mine == theirs:
        return None
    by_text = {c["claim"]: c for c in again}
    for c in stored:
        if canonical(c) not in theirs:
            raise ReportError(
                f"{chapter}: the claims in its results do not follow from its numbers. The claim "
                f"{json.dumps(c)[:600]} is stored; the chapter's rule gives "
                f"{json.dumps(by_text.get(c.get('claim'), 'no such claim'))[:600]}. Run it again: {rerun}")
    missing = [c["claim"] for c in again if canonical(c) not in mine]
    raise ReportError(f"{chapter}: the chapter's rule gives claims its results do not store: {missing[:3]}. "
                      f"Run it again: {rerun}")


def gather_claims(results_dir: Path, chapters: Sequence[str]) -> list[dict[str, Any]]:
    """The claims of each chapter in book order: ``{chapter, profile, claim, source, status, evidence}``,
    each chapter's checked against its own numbers first (:func:`check_claims`).

    Args:
        results_dir: ``<reports>/results``.
        chapters: the book's chapters (``NN_topic.ipynb``); a chapter without a results file or without
            claims contributes nothing.
    """
    out: list[dict[str, Any]] = []
    for chapter in chapters:
        if not chapter.endswith(".ipynb"):
            continue
        path = Path(results_dir) / (Path(chapter).stem + ".json")
        if not path.is_file():
            continue
        results = json.loads(path.read_text(encoding="utf-8"))
        unchecked = check_claims(Path(chapter).stem, results)
        if unchecked:
            print(f"warning: {unchecked}", file=sys.stderr)
        profile = ((results.get("provenance") or {}).get("parameters") or {}).get("profile", "?")
        for c in results.get("claims") or []:
            out.append({"chapter": Path(chapter).stem, "profile": profile, **c})
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def claims_markdown(claims: Sequence[Mapping[str, Any]], titles: Mapping[str, str] | None = None) -> str:
    """The claims page in Markdown: a count per status and profile, then one table row per claim."""
    titles = titles or {}
    lines = ["---", 'title: "What the runs reproduce"', "---", "",
             "Every chapter checks the claims of its paper that its experiment can test, and records each as "
             "*reproduced* (the 95 % interval lies on the predicted side), *not reproduced* (it lies on the "
             "other side) or *not testable* at the size that ran (too wide to decide, or the size cannot "
             "show it). This page gathers them from the results of the run that built this book; the "
             "evidence (estimates and intervals) is in each chapter's results JSON.", ""]
    if not claims:
        lines.append("No chapter of this run recorded claims.")
        return "\n".join(lines) + "\n"
    for profile, group in _by_profile(claims).items():
        counts = Counter(c["status"] for c in group)
        lines.append(f"At the `{profile}` size: {counts.get('reproduced', 0)} of {len(group)} claims reproduced, "
                     f"{counts.get('not_reproduced', 0)} not reproduced, {counts.get('not_testable', 0)} not "
                     "testable.")
    lines += ["", "| Chapter | Size | Claim | Source | Status |", "|---|---|---|---|---|"]
    for c in claims:
        chapter = titles.get(c["chapter"], c["chapter"])
        lines.append(f"| {_cell(chapter)} | `{c['profile']}` | {_cell(c['claim'])} | [@{c['source']}] | "
                     f"{STATUS_LABELS.get(c['status'], _cell(c['status']))} |")
    return "\n".join(lines) + "\n"


def _by_profile(claims: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for c in claims:
        out.setdefault(str(c["profile"]), []).append(c)
    return out


def write_claims_page(reports: Path, chapters: Sequence[str], titles: Mapping[str, str] | None = None) -> Path:
    """Write ``<reports>/claims.qmd`` from ``<reports>/results`` (atomically); return its path."""
    path = Path(reports) / CLAIMS_PAGE
    atomic_write_text(path, claims_markdown(gather_claims(Path(reports) / "results", chapters), titles))
    return path

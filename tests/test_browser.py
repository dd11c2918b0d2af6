"""The book and JupyterLab, checked in a real browser: Debian's Chromium driven by Playwright.

Playwright's own browser download needs the web, so the tests drive the system Chromium
(`apt-get install chromium`; `.ci/run` installs it). Without Playwright or a Chromium they skip and
say why. Screenshots land in the tests' temporary folders.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import smoke_data_dir
from mergelab import course, report

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "00_benchmark_and_baselines"
pytestmark = pytest.mark.browser


def chromium_executable() -> str | None:
    """``$MERGELAB_CHROMIUM``, else the first Chromium or Chrome on ``PATH``."""
    if os.environ.get("MERGELAB_CHROMIUM"):
        return os.environ["MERGELAB_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (the system's, not Playwright's download)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: `make env` installs the "
                                                                 "dev extra, which has it")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium on PATH: `apt-get install chromium` (Debian; .ci/run does it) or set MERGELAB_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if hasattr(os, "getuid") and os.getuid() == 0 else []
        chromium = playwright.chromium.launch(executable_path=executable, args=args)
        yield chromium
        chromium.close()


def open_page(browser, url: str, console: list[str]):
    """A new page at ``url`` that records console errors and uncaught exceptions in ``console``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("console", lambda message: console.append(f"console {message.type}: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page


def screenshot(page, path: Path) -> None:
    """Save what the page shows (for whoever reads the test's folder), trying once more after a second: on a
    loaded machine Chromium can fail to produce a frame in time ("Unable to capture screenshot", seen once in
    ``make test``); a second failure is raised."""
    from playwright.sync_api import Error

    try:
        page.screenshot(path=str(path), full_page=False)
    except Error:
        page.wait_for_timeout(1000)
        page.screenshot(path=str(path), full_page=False)


# --- the book ----------------------------------------------------------------------------------

_ID = re.compile(r'\sid="([^"]+)"')


def test_smoke_book_reads_like_a_book(smoke_report, browser, tmp_path: Path) -> None:
    reports, completed = smoke_report
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    book = reports / "_book"
    chapters = report.book_chapters(ROOT / "reports" / "_quarto.yml")
    pages = ["index.html", *(Path(c).with_suffix(".html").as_posix() for c in chapters[1:])]
    ids = {p: set(_ID.findall((book / p).read_text(encoding="utf-8"))) for p in pages}
    for name in pages:
        console: list[str] = []
        page = open_page(browser, (book / name).as_uri(), console)
        text = page.inner_text("body")
        for raw in ("[@", "$\\", "#|", "PosixPath(", "?fig-"):
            assert raw not in text, f"{name} shows {raw!r} to the reader: ...{text[max(0, text.find(raw) - 80):][:200]}..."
        screenshot(page, tmp_path / f"{Path(name).stem}.png")

        figures = page.query_selector_all("figure")
        for figure in figures:
            caption = figure.query_selector("figcaption")
            assert caption and re.match(r"Figure \d+\.\d+: \S", caption.inner_text()), f"{name}: figure without a number"
            image = figure.query_selector("img")
            assert image and image.evaluate("i => i.complete && i.naturalWidth > 0"), f"{name}: a figure's image did not load"
        for link in page.query_selector_all("a.fig-ref"):
            target = link.get_attribute("href")
            assert target.startswith("#") and page.query_selector(f"figure[id='{target[1:]}']"), f"{name}: {target} is no figure"
        if name.endswith(tuple(f"{Path(c).stem}.html" for c in chapters if c.endswith(".ipynb"))):
            source = nbformat.read(reports / Path(name).with_suffix(".ipynb").name, as_version=4)
            labels = {m for c in source.cells if c.cell_type == "code" for m in re.findall(r"#\| label: (fig-[\w-]+)", c.source)}
            assert {f.get_attribute("id") for f in figures} == labels, f"{name}: labelled figures missing"
            refs = {m for c in source.cells if c.cell_type == "markdown" for m in re.findall(r"@(fig-[\w-]+)", c.source)}
            assert refs <= {a.get_attribute("href")[1:] for a in page.query_selector_all("a.fig-ref")}
            if any("$" in c.source for c in source.cells if c.cell_type == "markdown"):
                boxes = [m.bounding_box() for m in page.query_selector_all("math")]
                assert boxes, f"{name}: no math"
                assert all(b and b.get("width", 0) > 0 and b.get("height", 0) > 0 for b in boxes[:20]), \
                    f"{name}: math not laid out"
            assert page.query_selector('details.parameters'), f"{name}: no folded parameters table"
            exercises = course.exercises(source, Path(name).stem)  # the exercises: numbered callouts, solutions folded
            titles = [c.inner_text().strip() for c in page.query_selector_all("div.callout-exercise h3")]
            assert titles == [f"Exercise {e.number}: {e.title}" for e in exercises], f"{name}: exercise callouts {titles}"
            folds = page.query_selector_all("details.solution")
            assert len(folds) >= len(exercises) and (not exercises or folds), f"{name}: solutions not folded"
            for fold in folds:
                assert re.fullmatch(r"Solution to exercise \d+\.\d+", fold.query_selector("summary").inner_text().strip())
                body = fold.query_selector(":scope > :not(summary)")
                assert body and not body.is_visible(), f"{name}: a solution is shown before it is unfolded"
                fold.query_selector("summary").click()
                assert body.is_visible(), f"{name}: a solution does not unfold"
        if name == "teaching.html":  # the teacher's page, with its session table from the timing record
            assert "make student" in text and "make report" in text and "docs/clip.md" in text
            header = [th.inner_text().strip() for th in page.query_selector_all("table th")]
            assert header[:3] == ["Session", "Chapter", "Run time at tiny"], header
            assert len(page.query_selector_all("table tbody tr")) == sum(c.endswith(".ipynb") for c in chapters)

        for href in page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))"):
            if re.match(r"[a-z]+:", href):
                continue
            target, _, fragment = html.unescape(href).partition("#")
            target = target or name
            assert target in ids, f"{name} links to {href}, which is no page of the book"
            assert not fragment or fragment in ids[target], f"{name} links to {href}, which has no such anchor"
        assert not console, f"{name}: {console}"
        page.close()


# --- JupyterLab ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_copy_of_notebooks(folder: Path) -> Path:
    """``notebooks/`` copied to ``folder``, chapter 00 carrying the ``smoke`` parameters as papermill
    injects them (a cell tagged ``injected-parameters`` after the ``parameters`` cell), not executed."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    shutil.copytree(ROOT / "notebooks", folder)
    path = folder / f"{CHAPTER}.ipynb"
    nb = load_notebook_node(str(path))  # as papermill reads it
    nb = parameterize_notebook(nb, report.profile_params("smoke", CHAPTER), kernel_name="mergelab", language="python")
    nbformat.write(nb, path)
    return path


def start_lab(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """JupyterLab started by ``make lab`` itself (its kernel, its strip-on-save hook), on ``folder``
    (``LAB_DIR``), 127.0.0.1, a free port and a token; returns the ``make`` process (the leader of its
    own process group, so that :func:`stop_lab` stops the server too) and the notebook's URL."""
    port, token = free_port(), secrets.token_hex(16)
    lab_args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token} --ServerApp.port_retries=0"
    command = ["make", "--no-print-directory", "lab", f"LAB_DIR={folder}", f"LAB_ARGS={lab_args}",
               f"VENV={Path(sys.executable).parents[1]}"]
    log = open(folder.parent / "jupyterlab.log", "w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError("make lab exited: " + (folder.parent / "jupyterlab.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return server, f"{url}/lab/tree/{CHAPTER}.ipynb?token={token}"
        except OSError:
            time.sleep(0.5)
    stop_lab(server)
    raise AssertionError("JupyterLab did not answer within 120 s: " + (folder.parent / "jupyterlab.log").read_text()[-3000:])


def stop_lab(server: subprocess.Popen) -> None:
    """Stop ``make lab`` and the JupyterLab server it started (their process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.timeout(1800)  # chapter 00 at smoke: 721 s on 2 shared cores at load ~20; far less on an idle machine
def test_jupyterlab_runs_chapter_00_at_smoke(browser, tmp_path: Path) -> None:
    notebook = smoke_copy_of_notebooks(tmp_path / "notebooks")
    # the smoke book's cache folder: its encoder and experts are built once per test session, whichever test comes first
    env = {**os.environ, "MERGELAB_DATA_DIR": str(smoke_data_dir()),
           "JUPYTER_PREFER_ENV_PATH": "1", "MERGELAB_REPORTS_DIR": str(tmp_path / "reports"),
           "MERGELAB_RESULTS_DIR": str(tmp_path / "reports" / "results"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces")}
    server, url = start_lab(notebook.parent, env)
    console: list[str] = []
    page = None
    try:
        page = open_page(browser, url, console)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        kernel = page.locator(".jp-NotebookPanel-toolbar").get_by_text("Python (mergelab)")
        kernel.wait_for(timeout=60_000)  # the kernel offered for the notebook is the project's
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)

        start = time.monotonic()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()  # Run > Run All Cells
        page.wait_for_function(  # every code cell has run (an execution count, no [*]), or one failed:
            # Run All stops at an error, and the cells after it would never get a count
            """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
                       const failed = [...document.querySelectorAll('.jp-OutputArea-output')]
                           .some(o => o.innerText.includes('Traceback (most recent call last)'));
                       return failed || (p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t))); }""", timeout=1_500_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
        seconds = time.monotonic() - start
        print(f"JupyterLab ran {CHAPTER} at smoke in {seconds:.0f} s")

        outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
        errors = [t for t in outputs if "Traceback (most recent call last)" in t or re.match(r"\w+Error: ", t)]
        assert not errors, "a cell shows an error: " + errors[0][:2000]
        image = page.locator(".jp-OutputArea-output img").first
        image.scroll_into_view_if_needed()
        assert image.evaluate("i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0"), "the first figure did not render"
        results = tmp_path / "reports" / "results" / f"{CHAPTER}.json"
        assert json.loads(results.read_text())["provenance"]["parameters"]["profile"] == "smoke"
    finally:
        try:
            if page is not None:  # what the page showed, passed or failed
                screenshot(page, tmp_path / "jupyterlab.png")
        finally:
            stop_lab(server)
    assert server.returncode is not None
    assert not console, console

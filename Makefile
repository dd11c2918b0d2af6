# mergelab: notebooks, a tested package and a report book. `make help` lists what you can do.

PYTHON ?= python3## interpreter that creates the virtual environment
VENV ?= .venv## virtual environment folder
PROFILE ?= tiny## parameter profile: smoke, tiny, clip or clip_smoke (any folder under params/)
REPORTS ?= reports## where executed notebooks, results and the book go
DATA ?=## clip profile: folder with the datasets (exported as MERGELAB_CLIP_DATA_ROOT; weights: WEIGHTS)
WEIGHTS ?=## clip profile: folder for downloaded open_clip weights (exported as MERGELAB_CLIP_WEIGHTS_DIR)
NOTEBOOKS ?=## run only these notebooks (names without .ipynb; empty = all)
FORCE ?=## set to 1 to execute notebooks even when they are up to date (make report), or to overwrite student notebooks that were changed (make student)
EXECUTOR ?=## where the chapters' sweeps run: local or ray (a Ray cluster, docs/distributed.md); empty = each parameter file's executor
RENDERER ?=## the book's renderer: auto (Quarto if found, else pandoc; empty = auto), quarto or pandoc
JOBS ?=## chapters executed at a time, chapter 00 included (auto: one per core, at most 4; empty = auto; 1 = one after another)
PYTEST_ARGS ?=## extra pytest arguments, e.g. PYTEST_ARGS='-m "not e2e" -x'
TEST_WORKERS ?= auto## test processes (pytest-xdist; auto: one per CPU core; 0: all tests in one process)
INSTALLER ?= uv## what make env installs packages with: uv (put into the venv by pip first; about 2.5 times faster here; it reads UV_* variables, not pip's configuration, and where it fails make env says so and uses pip) or pip

.DEFAULT_GOAL := help
SHELL := /bin/bash

# The kernel installed into the venv wins over a user-level kernel of the same name.
export JUPYTER_PREFER_ENV_PATH := 1
ifneq ($(strip $(DATA)),)
export MERGELAB_CLIP_DATA_ROOT := $(abspath $(DATA))
endif
ifneq ($(strip $(WEIGHTS)),)
export MERGELAB_CLIP_WEIGHTS_DIR := $(abspath $(WEIGHTS))
endif
# A folder given as a relative path, in the environment or on make's command line, names the same folder for every
# process (JupyterLab's and the report's kernels run in notebooks/): the list is mergelab.paths.DIR_VARIABLES.
DIR_VARIABLES := MERGELAB_HOME MERGELAB_DATA_DIR MERGELAB_REPORTS_DIR MERGELAB_RESULTS_DIR MERGELAB_CLIP_DATA_ROOT \
	MERGELAB_CLIP_WEIGHTS_DIR MERGELAB_CLIP_EXPERTS_DIR
$(foreach v,$(DIR_VARIABLES),$(if $(strip $($(v))),$(eval override $(v) := $(abspath $($(v))))$(eval export $(v))))

PY := $(VENV)/bin/python
ifeq ($(filter uv pip,$(strip $(INSTALLER))),)
$(error INSTALLER=$(INSTALLER) is not valid: uv or pip)
endif
STAMP := $(VENV)/.installed

.PHONY: help env lock git-filter quarto report student test bench lab clean-report clean-cache

help: ## show this help
	@echo "Usage: make <target> [VARIABLE=value ...]"
	@echo
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo
	@echo "Variables:"
	@grep -E '^[A-Z_]+ \?=.*## ' $(MAKEFILE_LIST) | sed -E 's/^([A-Z_]+) \?= *([^#]*)## (.*)/  \1\t\3 [\2]/' | expand -t 16

env: $(STAMP) ## create the virtual environment, install the package and the "mergelab" Jupyter kernel

# $(call install,ARGS): `pip install ARGS` into the venv, by uv where INSTALLER=uv put it there (bytecode compiled, as pip
# does; a conda environment always uses pip); a failed uv install is said and done again by pip, which reads pip's own
# configuration (index, mirrors).
install = if [ "$(strip $(INSTALLER))" = uv ] && [ ! -d $(VENV)/conda-meta ] && [ -x $(VENV)/bin/uv ]; then $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode $(1) \
	|| { echo "make env: uv could not install $(1); installing it with pip instead (INSTALLER=pip skips uv)"; \
	$(PY) -m pip install $(1); }; else $(PY) -m pip install $(1); fi

EDITABLE := '.[dev,lab]'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(strip $(INSTALLER))" = uv ] && [ ! -d $(VENV)/conda-meta ]; then $(PY) -m pip install -q 'uv>=0.4' \
		|| echo "make env: could not install uv with pip; installing with pip"; \
	else $(PY) -m pip install --upgrade pip; fi
	@if [ -d $(VENV)/conda-meta ]; then \
		echo "$(VENV) is a conda environment: its packages come from environment.yml (conda-forge), requirements.lock is not installed over them"; \
	elif [ -f requirements.lock ] && [ "$$(uname -sm)" = "$(LOCK_PLATFORM)" ]; then \
		echo "installing the exact versions of requirements.lock"; $(PY) scripts/lock.py --for-env $(VENV)/requirements.lock \
		&& { $(call install,-r $(VENV)/requirements.lock); }; \
	else echo "no lock for $$(uname -sm): installing the newest versions pyproject.toml allows"; fi
	@echo "installing mergelab (editable) with its dev and lab extras"; $(call install,-e $(EDITABLE))
	$(PY) -m ipykernel install --sys-prefix --name mergelab --display-name "Python (mergelab)"
	$(MAKE) --no-print-directory git-filter
	touch $@

LOCK_PLATFORM := Linux x86_64

lock: env ## record the exact versions of this environment's requirements in requirements.lock (used by env on Linux x86_64)
	$(PY) scripts/lock.py

git-filter: ## strip outputs and kernel metadata from notebooks on their way into git (nbstripout; run by env)
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(PY) -m mergelab.lab --install-git-filter; \
	else echo "git filter: not a git checkout, nothing to install"; fi

quarto: env ## try to install Quarto into the venv (pip install quarto-cli; it downloads Quarto from the web)
	@$(PY) -m pip install -e '.[quarto]' && $(VENV)/bin/quarto --version || { \
		echo "quarto: could not install Quarto with pip (quarto-cli downloads it from the web)."; \
		echo "Install it from https://quarto.org or conda-forge (conda install -c conda-forge quarto); until then"; \
		echo "make report renders the book with pandoc."; exit 1; }

report: env ## execute the notebooks that changed (PROFILE, NOTEBOOKS, FORCE, EXECUTOR, JOBS) and render the book into REPORTS/_book (Quarto if found, else pandoc; it says which)
	$(PY) -m mergelab.report --profile $(PROFILE) --reports $(REPORTS) \
		$(if $(strip $(NOTEBOOKS)),--notebooks $(NOTEBOOKS)) $(if $(strip $(FORCE)),--force) \
		$(if $(strip $(EXECUTOR)),--executor $(EXECUTOR)) $(if $(strip $(JOBS)),--jobs $(JOBS)) \
		$(if $(strip $(RENDERER)),--renderer $(RENDERER))

student: env ## write the student notebooks students/<chapter>.ipynb from the chapters (solutions removed; NOTEBOOKS; a changed one is kept unless FORCE=1)
	$(PY) -m mergelab.course --out students $(if $(strip $(NOTEBOOKS)),--notebooks $(NOTEBOOKS)) $(if $(filter 1,$(strip $(FORCE))),--force)

test: env ## run the tests, one process per core (TEST_WORKERS, PYTEST_ARGS passed through)
	$(PY) -m pytest $(if $(filter-out 0,$(strip $(TEST_WORKERS))),-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

bench: env ## run every perf/bench_*.py
	@shopt -s nullglob; for script in perf/bench_*.py; do \
		echo "== $$script"; $(PY) "$$script" || exit 1; \
	done

LAB_ARGS ?=## extra JupyterLab options, e.g. LAB_ARGS='--port 8890 --no-browser'
LAB_DIR ?= notebooks## the folder JupyterLab opens (the browser test opens a copy of the chapters)

lab: env ## open the notebooks in JupyterLab with the project's kernel; chapters are saved without outputs (LAB_ARGS passed through)
	$(VENV)/bin/jupyter lab $(LAB_DIR) --FileContentsManager.pre_save_hook=mergelab.lab.strip_on_save \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean-report: ## remove executed notebooks, the book, results, figures and stamps from REPORTS
	$(if $(strip $(REPORTS)),,$(error REPORTS is empty))
	@if git ls-files --error-unmatch $(REPORTS)/'*.ipynb' >/dev/null 2>&1; then \
		echo "clean-report: $(REPORTS) holds notebooks committed to git; refusing to delete them (REPORTS must be a report folder, e.g. reports)."; exit 1; fi
	rm -rf $(REPORTS)/_book $(REPORTS)/results $(REPORTS)/figures $(REPORTS)/.stamps $(REPORTS)/.quarto $(REPORTS)/timings
	rm -f $(REPORTS)/*.ipynb $(REPORTS)/.*.running.ipynb

CACHE_DIR = $(or $(MERGELAB_DATA_DIR),data)

clean-cache: ## remove generated data, pretrained encoders and experts cached in data/ or $MERGELAB_DATA_DIR (keeps data/README.md)
	@if [ -e "$(CACHE_DIR)/.git" ] || [ -e "$(CACHE_DIR)/pyproject.toml" ] || [ "$$(cd "$(CACHE_DIR)" 2>/dev/null && pwd)" = "$$HOME" ]; then \
		echo "clean-cache: $(CACHE_DIR) looks like a checkout or your home folder, not a cache; refusing to empty it."; exit 1; fi
	@cache="$$(cd "$(CACHE_DIR)" 2>/dev/null && pwd -P)"; \
	for kept in "$$MERGELAB_CLIP_DATA_ROOT" "$$MERGELAB_CLIP_EXPERTS_DIR" "$$MERGELAB_CLIP_WEIGHTS_DIR"; do \
		[ -n "$$kept" ] && [ -n "$$cache" ] || continue; \
		real="$$(cd "$$kept" 2>/dev/null && pwd -P)" || continue; \
		case "$$real/" in "$$cache"/*) echo "clean-cache: $$kept (datasets, imported experts or open_clip weights) lies inside $(CACHE_DIR); refusing to delete it. Move it out of the cache, or delete by hand."; exit 1;; esac; \
	done
	find $(CACHE_DIR) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

# `make train`: set up and run the main job on its defaults. `make test`: set up, run the whole suite on the newest
# supported jax, then the smoke subset on the oldest (jax 0.10.2 on Python 3.11).

# The newest Python here that the newest supported jax accepts (jax 0.11+ needs 3.12+), pyenv installs included.
find_python = $(firstword $(foreach v,$(1),$(shell for p in python$(v) $$(ls -d $$HOME/.pyenv/versions/$(v).*/bin/python$(v) 2>/dev/null | sort -rV); do $$p -c '' 2>/dev/null && { command -v $$p; break; }; done)))
PYTHON ?= $(or $(call find_python,3.13 3.12),python3)
PYTHON_OLDEST ?= $(or $(call find_python,3.11),python3)
# The oldest release of each dependency the project supports (pyproject.toml's lower bounds).
OLDEST := jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 matplotlib==3.9.0

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OLD := .venv-oldest
OLD_STAMP := $(OLD)/.installed

.PHONY: setup setup-both train test test-full test-oldest test-sweep clean

setup: $(STAMP)

# Each environment in two steps: its dependencies (read from pyproject.toml, the one list), then the project itself,
# editable. Both are installed by uv, which pip bootstraps into the environment: uv downloads and unpacks in parallel
# (a fresh environment's dependencies in ~5 s here, where pip took ~40 s on 2 cores). `make test` sets up both
# environments at once, then the two editable installs one after the other (each writes autoshard.egg-info here).
deps_of = $(1) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(' '.join(p['dependencies'] + p['optional-dependencies']['test']))"

uv_install = $(1) -m uv pip install --quiet --python $(1)
# uv writes no bytecode, and this machine sets PYTHONDONTWRITEBYTECODE: every process (each pytest worker, each
# command a test starts) would compile jax, flax and autoshard from source, 7 s an import of the stack where 2 s from
# .pyc files. The environments and the checkout are this project's: Python writes its bytecode there.
unexport PYTHONDONTWRITEBYTECODE
warm = $(1) -c 'import sys, jax, autoshard.train, autoshard.cli, planner.search, models; \
	print("$(2): Python", sys.version.split()[0], "jax", jax.__version__)'

$(VENV)/.deps: pyproject.toml
	@# an environment left by another Python (an older checkout's 3.11) is rebuilt, not upgraded in place
	if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])')" != \
	     "$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then rm -rf $(VENV); fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(call uv_install,$(BIN)/python) --upgrade $$($(call deps_of,$(BIN)/python))
	touch $@

$(STAMP): $(VENV)/.deps
	$(call uv_install,$(BIN)/python) --no-deps -e .
	$(call warm,$(BIN)/python,autoshard env)
	touch $(STAMP)

$(OLD)/.deps: pyproject.toml
	test -d $(OLD) || $(PYTHON_OLDEST) -m venv $(OLD)
	$(OLD)/bin/python -m pip install --quiet uv
	$(call uv_install,$(OLD)/bin/python) $$($(call deps_of,$(OLD)/bin/python)) $(OLDEST)
	touch $@

$(OLD_STAMP): $(OLD)/.deps | $(STAMP)
	$(call uv_install,$(OLD)/bin/python) --no-deps -e .
	$(call warm,$(OLD)/bin/python,oldest env)
	touch $(OLD_STAMP)

train: $(STAMP)
	$(BIN)/autoshard train $(ARGS)

test: setup-both test-full test-oldest

setup-both:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(OLD_STAMP)

# Two pytest workers (one per core); a test file stays on one worker, so its compiled fixtures are built once.
PYTEST_WORKERS ?= -n 2 --dist loadfile

test-full: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) -m "not sweep" --durations=15 $(ARGS)

# The further cases of parametrized checks that `make test` leaves out (tests/conftest.py SWEEP).
test-sweep: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) -m sweep $(ARGS)

test-oldest: $(OLD_STAMP)
	$(OLD)/bin/python -m pytest -q $(PYTEST_WORKERS) -m smoke $(ARGS)

clean:
	rm -rf $(VENV) $(OLD) runs/local

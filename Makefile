# Two commands do all the set-up: `make demo` and `make test`.
# Both create or reuse .venv and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WHEELS ?= ../shared/wheels
STAMP := $(VENV)/.sanitize-installed

.PHONY: test demo install clean

install: $(STAMP)

# torch and torchvision are pinned here, not in pyproject.toml, so that the
# package also installs beside the torch 2.11 / torchvision 0.26 of the GPU machine.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check --find-links $(WHEELS) -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m sanitize demo

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv lock clean

venv: $(STAMP)

# Re-installs only when the pins or the package metadata change, so a set-up machine is quick.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash experiments/demo.sh

test: $(STAMP)
	$(PY) -m pytest

lock: $(STAMP)
	{ echo "# Every package the project installs, pinned (pip freeze of a fresh .venv). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu//'; } > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info

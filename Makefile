# The README's two commands: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; the package metadata keeps a range.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# OpenMP threads wait passively: spinning threads collapse on a CPU shared with other jobs (see MASRefineLib/__init__.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[test]' "$(TORCH_PIN)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest Testing -q -ra --durations=15

demo: $(STAMP)
	$(PY) -m MASRefineLib.demo --out .cache/demo

clean:
	rm -rf $(VENV) .cache build *.egg-info

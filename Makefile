# Two commands are all the set-up a user needs: `make test` and `make demo`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean-venv

install: $(STAMP)

# torch/torchvision come from this machine's local wheels (pip's constraint file); the TFLite extras are installed
# too so the TFLite path is tested in CI.
$(STAMP): requirements.txt requirements-tflite.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-tflite.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean-venv:
	rm -rf $(VENV)

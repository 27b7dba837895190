# `make demo` and `make test` work from a fresh clone: they create .venv and install pinned versions first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench clean

venv: .venv/.installed

.venv/.installed: setup.py constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade-strategy only-if-needed -c constraints.txt -e '.[test,export,web]'
	touch $@

demo: venv
	$(PY) tools/run_chain.py --config-file configs/shapes/chain.yaml

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

bench: venv
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_vocabulary.py
	$(PY) benchmarks/bench_region_embeddings.py
	$(PY) benchmarks/bench_eval.py --images 1000

clean:
	rm -rf output

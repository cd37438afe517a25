# Two commands do all the set-up on a fresh machine (Python 3.11+):
#   make demo   - virtual env, install, start the server, run the client on the embedded model, PNGs in out/
#   make test   - virtual env, install with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install proto bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" -e "./clients/python[render]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) benchmarks/bench_activations.py

clean:
	rm -rf $(VENV) out

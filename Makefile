# One-command setup: `make test` and `make demo` create .venv on first use and install requirements.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo

.PHONY: test demo compare-demo clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) train.py --config config/digits/E.yaml --outdir $(RUN)/E

clean-demo:
	rm -rf $(RUN)

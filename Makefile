# One-command setup: `make test` and `make demo` create .venv on first use and install requirements.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo
CMP    := runs/compare-demo

.PHONY: test demo compare-demo clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The main job on the bundled digits: train Config E (~3 min on 2 CPU cores), sample 1,000 images and
# score them (FID/KID when Inception weights are available), then the linear probe.
demo: $(VENV)/.installed
	$(PY) train.py --config config/digits/E.yaml --outdir $(RUN)/E
	$(PY) sample.py --config config/digits/E.yaml --outdir $(RUN)/E --seeds 0-999 --fid auto
	$(PY) probe.py --config config/digits/E.yaml --outdir $(RUN)/E
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUN)/E/tensorboard"

# C, E and G side by side on digits (~8 min on 2 CPU cores): train, sample, probe, post-hoc EMA sweep, table and plots.
compare-demo: $(VENV)/.installed
	for c in C E G; do \
	  $(PY) train.py --config config/digits/$$c.yaml --outdir $(CMP)/$$c train.epochs=10 && \
	  $(PY) sample.py --config config/digits/$$c.yaml --outdir $(CMP)/$$c --seeds 0-499 --fid auto && \
	  $(PY) probe.py --config config/digits/$$c.yaml --outdir $(CMP)/$$c && \
	  $(PY) tools/ema_sweep.py --config config/digits/$$c.yaml --outdir $(CMP)/$$c --sigma-rels 0.05,0.10,0.15 --num-images 500 \
	  || exit 1; \
	done
	$(PY) tools/compare.py $(CMP)/C $(CMP)/E $(CMP)/G --out $(CMP)/compare

clean-demo:
	rm -rf $(RUN) $(CMP)

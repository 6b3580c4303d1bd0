# One-command setup: `make test` and `make demo` create .venv on first use and install the pinned
# requirements-lock.txt (plus requirements-test.txt for the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo
CMP    := runs/compare-demo
GUIDE  := runs/guidance-demo
AUG    := runs/augment-demo

.PHONY: test demo compare-demo guidance-demo augment-demo clean-demo

$(VENV)/.installed: requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-lock.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

# The main job on the bundled digits: train Config E (~3 min on 2 CPU cores, with a validation loss and a
# quality curve every 5 epochs), sample 1,000 images and
# score them offline (FD/KID/precision/recall with the dataset classifier, memorisation), then the linear probe.
demo: $(VENV)/.installed
	$(PY) train.py --config config/digits/E.yaml --outdir $(RUN)/E
	$(PY) sample.py --outdir $(RUN)/E --seeds 0-999 --score
	$(PY) probe.py --outdir $(RUN)/E
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUN)/E/tensorboard"

# C, E and G side by side on digits (26 min on 2 CPU cores when measured, plus ~15 s for each of the 9 training-time
# evaluations): each config trains CMP_EPOCHS epochs with a validation loss and quality curve every CMP_EVERY; the
# classic-EMA samples are scored at three checkpoints (CMP_IMAGES samples = 4 seed blocks each), then the
# probe and a post-hoc EMA sweep at the end; tools/compare.py ranks the runs with their spreads and plots the curves.
CMP_EPOCHS := 30
CMP_EVERY  := 10
CMP_IMAGES := 1000
compare-demo: $(VENV)/.installed
	for c in C E G; do \
	  $(PY) train.py --config config/digits/$$c.yaml --outdir $(CMP)/$$c train.epochs=$(CMP_EPOCHS) \
	    train.checkpoint_epochs=$(CMP_EVERY) train.keep_checkpoints=0 train.grid_epochs=$(CMP_EVERY) train.eval_epochs=$(CMP_EVERY) && \
	  for e in $$(seq $(CMP_EVERY) $(CMP_EVERY) $(CMP_EPOCHS)); do \
	    $(PY) sample.py --outdir $(CMP)/$$c --epoch $$e --seeds 0-$$(($(CMP_IMAGES) - 1)) --score || exit 1; \
	  done && \
	  $(PY) probe.py --outdir $(CMP)/$$c && \
	  $(PY) -m tools.ema_sweep --outdir $(CMP)/$$c --sigma-rels 0.05,0.10,0.15 --num-images $(CMP_IMAGES) \
	  || exit 1; \
	done
	$(PY) -m tools.compare $(CMP)/C $(CMP)/E $(CMP)/G --out $(CMP)/compare

# Class-conditional digits Config E (~16 min in all on 2 CPU cores; labels dropped 10% of the time), then 1,000 samples
# of the balanced class mix per guidance weight, unguided (W = 1), with classifier-free guidance and with
# autoguidance by the run's own epoch-5 checkpoint; each scored (FD/KID/precision/recall and the dataset
# classifier's accuracy against the requested class, mean +- std over seed blocks). Both sweeps share one plot:
# $(GUIDE)/E-cond/guidance_sweep_epoch_20.png.
GUIDE_WEIGHTS := 1,1.5,2,3
guidance-demo: $(VENV)/.installed
	$(PY) train.py --config config/digits/E-cond.yaml --outdir $(GUIDE)/E-cond train.keep_checkpoints=0
	$(PY) -m tools.guidance_sweep --outdir $(GUIDE)/E-cond --weights $(GUIDE_WEIGHTS)
	$(PY) -m tools.guidance_sweep --outdir $(GUIDE)/E-cond --weights $(GUIDE_WEIGHTS) --guide $(GUIDE)/E-cond:5

# Non-leaky augmentation against memorisation on digits (docs/AUGMENTATION.md): Config E on 100 training images
# (config/digits/E-augment.yaml: 500 epochs, a validation loss and quality curve every 50) at each augment.p (and
# augment.xflip) of AUG_PS with two training seeds, 1,000 samples of the final checkpoint scored; tools/compare.py's
# replicates table averages the seeds. About 8 minutes a run on 2 CPU cores.
AUG_PS := 0 0.12 0.3
augment-demo: $(VENV)/.installed
	for p in $(AUG_PS); do for s in 0 1; do \
	  $(PY) train.py --config config/digits/E-augment.yaml --outdir $(AUG)/p$$p-seed$$s augment.p=$$p augment.xflip=$$p train.seed=$$s && \
	  $(PY) sample.py --outdir $(AUG)/p$$p-seed$$s --seeds 0-999 --score || exit 1; \
	done; done
	$(PY) -m tools.compare $(AUG)/p*-seed* --out $(AUG)/compare

clean-demo:
	rm -rf $(RUN) $(CMP) $(GUIDE) $(AUG)

# The README's two commands: `make demo` and `make test`. Both create .venv from the pinned set
# (requirements.lock) on first use, with nothing installed but Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast selfcheck lint format lock clean gpu-check

demo: $(STAMP)
	$(VENV)/bin/resnet-train

selfcheck: $(STAMP)
	$(VENV)/bin/resnet-selfcheck

# Two pytest processes, each test file whole on one (its module fixtures start one cluster):
# Ray start-up and job latency then overlap, until the CPUs are busy (~90% of a 2-core run,
# most of it the processes Ray starts for each Train run). `make test TEST_WORKERS=0` runs it in
# one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# On a GPU machine, with its own Python (no venv needed there): the gpu-marked tests, then every
# figure of resnet-bench gpu (BENCHMARKS.md); IMAGES: a folder of JPEGs on that machine.
GPU_PY ?= python3
IMAGES ?= data/imagenet-sample

gpu-check:
	$(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu
	$(GPU_PY) -m pipelines.bench gpu --levers
	$(GPU_PY) -m pipelines.bench gpu --images $(IMAGES) --compile
	$(GPU_PY) -m pipelines.bench gpu --images $(IMAGES) --compile --decode device --decode-cpus 4

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(STAMP): requirements.lock pyproject.toml resnet_core/csrc/jpegregion.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the pinned set from pyproject.toml (needs network); review the diff before committing.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet ".[dev]"
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze --exclude resnet-ray; \
	  .lock-venv/bin/pip list --format=freeze | grep '^setuptools=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build _resnet_jpeg.*.so

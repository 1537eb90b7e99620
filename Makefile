# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv, install torch==2.13.0 first (any other torch spec pulls
# gigabytes of CUDA wheels), then this package with its pinned stack.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean-kit bench

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[dev,plots,real]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) -m entropy_guided_generation.demo $(ARGS)

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -n 2 --timeout 900 tests $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	for b in bench/*.py; do $(VPY) $$b || exit 1; done

clean-kit:
	rm -rf .kit_cache

# kubetune developer entry points. `make demo` runs the main job locally; `make test` runs
# every test. Both create ./.venv on first use (torch 2.13.0 CPU first, then kubetune[dev]).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch first, pinned: an unpinned torch pulled in by a dependency is several GB of CUDA wheels.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv demo test test-fast lint format check-generated bench crd docs-api chart-readme chart-schema chart-rbac apiserver tools lock clean

help:
	@echo "make demo   run the quickstart FineTuneJob locally (embedded default)"
	@echo "make test   install into $(VENV) and run the whole test suite"
	@echo "make lint   ruff (lint + format check), mypy on the packages, import contracts"
	@echo "make format apply ruff's fixes and formatting"
	@echo "make check-generated  fail if crds/, docs/api.md or the chart's generated files are stale"
	@echo "make bench  run the CPU benchmarks (benchmarks/README.md); not part of make test"
	@echo "make crd    regenerate crds/ from the API models (and the chart's copy, docs/api.md)"
	@echo "make docs-api     regenerate docs/api.md (the API reference) from the API models"
	@echo "make chart-readme regenerate charts/kubetune/README.md from values.yaml"
	@echo "make chart-schema  regenerate the chart's values.yaml, values.schema.json and README.md"
	@echo "make chart-rbac    regenerate the chart's operator RBAC rules from the measured API usage"
	@echo "make lock   re-resolve the dependencies into constraints.txt"

# constraints.txt pins every dependency to the versions the suite passed with (`make lock`).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt "$(TORCH)"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/kubetune run examples/quickstart.yaml
	$(VENV)/bin/kubetune verify kubetune-output/quickstart

# The test tiers need what PyPI cannot give: promtool; kubectl, docker.io and debootstrap from
# Debian; the 1.20 control plane and the 1.36 CRD server built from Debian sources; the base image
# our Dockerfiles start FROM. All cached under ~/.cache/kubetune: about 20 minutes once, then
# seconds (hack/cluster-tools.sh).
tools:
	bash hack/get-promtool.sh >/dev/null
	bash hack/cluster-tools.sh

apiserver:
	@if [ -z "$$KUBEBUILDER_ASSETS" ]; then bash hack/build-apiserver.sh; fi

test: venv tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Static checks, run by .ci/run before the tests: lint and formatting (ruff), types (mypy on the
# four packages), and the import contracts between the layers (pyproject.toml [tool.importlinter]).
MYPY_PACKAGES := -p kubetune.api -p kubetune.gateway -p kubetune.operator -p kubetune.trainer
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_PACKAGES)
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Every generated file is what its generator writes now (make crd / chart-schema / chart-rbac).
check-generated: venv
	$(VENV)/bin/kubetune crd | diff -u crds/finetunejobs.kubetune.io.yaml -
	diff -u crds/finetunejobs.kubetune.io.yaml charts/kubetune/files/finetunejobs.kubetune.io.yaml
	$(VENV)/bin/kubetune crd --markdown | diff -u docs/api.md -
	$(PY) hack/chart_schema.py --check
	$(PY) hack/chart_readme.py --check
	$(PY) hack/chart_rbac.py --check

# Without the real API server and the cluster tiers (no builds, no Docker): minutes, not half an hour.
test-fast: venv
	KUBETUNE_SKIP_REAL=1 KUBETUNE_SKIP_CLUSTER=1 $(PY) -m pytest -m "not real and not cluster" $(PYTEST_ARGS)

# The CPU benchmarks (benchmarks/README.md); each appends its section to benchmarks/RESULTS.md.
# operator_scale's real tier needs kube-apiserver + etcd, hence `apiserver`.
bench: venv apiserver
	$(PY) benchmarks/objectives_cost.py
	$(PY) benchmarks/trainer_vs_hf.py
	$(PY) benchmarks/trainer_memory.py
	$(PY) benchmarks/memory_grid.py
	$(PY) benchmarks/preference_memory.py
	$(PY) benchmarks/operator_scale.py

# The chart cannot read crds/ (outside its directory): it renders a byte-identical copy.
# Re-resolve every dependency in a fresh virtualenv and rewrite constraints.txt (then run make test).
lock:
	bash hack/lock.sh

crd: venv
	$(VENV)/bin/kubetune crd > crds/finetunejobs.kubetune.io.yaml
	cp crds/finetunejobs.kubetune.io.yaml charts/kubetune/files/finetunejobs.kubetune.io.yaml
	$(VENV)/bin/kubetune crd --markdown > docs/api.md

# docs/api.md: the API reference, generated from the same models as the CRD.
docs-api: venv
	$(VENV)/bin/kubetune crd --markdown > docs/api.md

# charts/kubetune/README.md: the chart's values table, generated from the commented values.yaml.
chart-readme: venv
	$(PY) hack/chart_readme.py

chart-schema: venv
	$(PY) hack/chart_schema.py
	$(PY) hack/chart_readme.py

chart-rbac: venv
	$(PY) hack/chart_rbac.py

clean:
	rm -rf $(VENV) kubetune-output .pytest_cache

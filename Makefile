# temlib: every target sets up .venv from pyproject.toml + constraints.txt when needed.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.temlib-installed
PROFILE ?= default
NB      ?=
PARAMS  ?=
PYTEST_ARGS ?=

.PHONY: setup reports report test bench lint clean-reports

setup: $(STAMP)                       ## create .venv and install temlib with every extra (pinned)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[all]" -c constraints.txt
	touch $(STAMP)

reports: setup                        ## run every notebook on PROFILE, write reports/*.html + index.html
	$(BIN)/python -m temlib reports --profile $(PROFILE)

report: setup                         ## one notebook: make report NB=04_regression PARAMS="-p phase NbC"
	$(BIN)/python -m temlib reports $(NB) --profile $(PROFILE) $(PARAMS)

test: setup                           ## the test suite (notebook smoke tests on params/ci)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup                          ## speed benchmarks: printed tables with ratios against peers
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check temlib tests benchmarks && $(BIN)/ruff format --check temlib tests benchmarks

clean-reports:
	rm -rf reports/*.html reports/*.ipynb

# Two commands for a new user: `make run` and `make test`. Each bootstraps
# what it needs (a .venv with the package and its tools) by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean venv docs dist

venv: $(STAMP)

$(STAMP): pyproject.toml
	@sh scripts/bootstrap-venv.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/broadcastd serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	@sh scripts/bootstrap-system.sh
	@sh scripts/bootstrap-helm.sh "$(VENV)"
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

# The manual as a site, in build/site. --strict: a broken link or anchor fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The release's packages in dist/: the sdist and the wheel (built from the
# sdist, so a file the sdist lacks fails here), checked by twine, and the
# JavaScript client's npm package.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	cd clients/js && npm pack --pack-destination ../../dist

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build dist *.egg-info clients/js/node_modules

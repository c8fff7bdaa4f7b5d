# The two commands of the README. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	$(PYTHON) -m pytest -q tests

lint:
	ruff check .

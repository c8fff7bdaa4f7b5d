# The two commands of the README. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3

.PHONY: install demo test test-all lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	bash scripts/install_cluster_deps.sh
	$(PYTHON) -m pytest -q tests

# Everything, the tests marked slow included (the full DeepSpeed option matrix, the 2 -> 4
# reshard, the HF Trainer's other stages, the whole Megatron sweep, ...): ~20 min on 2 idle cores.
test-all: install
	bash scripts/install_cluster_deps.sh
	$(PYTHON) -m pytest -q -m "" tests

lint:
	ruff check .
	ruff format --check .

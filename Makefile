# Two commands on a fresh machine:  make quickstart  |  make test
# Both create .venv when missing, install the project, and make sure Fashion-MNIST is present.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgecv-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: quickstart test test-all lint format data setup bench-int8 clean

setup: $(STAMP)

# The quick start trains, so it installs the `train` extra, with the exact torch of constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,dev]'
	@touch $(STAMP)

# Fashion-MNIST: the Debian package where apt and root are available, else torchvision's download into ./data
data: $(STAMP)
	@if [ -f $(FMNIST) ] || [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true; \
	fi; \
	if [ ! -f $(FMNIST) ]; then \
		$(BIN)/python -c "from edgecv.data.datasets import find_fashion_mnist; print('Fashion-MNIST:', find_fashion_mnist(None))"; \
	fi

quickstart: data
	$(BIN)/edgecv compress recipes/quickstart.yaml --device cpu

test: data
	$(BIN)/python -m pytest -q

test-all: data
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check edgecv tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format edgecv tests benchmarks

bench-int8: $(STAMP)
	$(BIN)/python benchmarks/int8_cpu.py

clean:
	rm -rf runs .pytest_cache .ruff_cache

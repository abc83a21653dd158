# Set-up and the project's two commands: `make train` (the main job) and `make test` (the suite).
# Both create .venv, install everything the project needs (PyPI packages and Debian's Fashion-MNIST), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install; override for another platform, e.g. make train TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= examples/configs/fashion_mnist_sam.yaml

.PHONY: setup train test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

setup: $(VENV)/.installed $(FASHION_MNIST)

train: setup
	$(BIN)/lightning-sam fit --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lightning_sam tests benchmarks examples

docs: setup
	$(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) site runs lightning_logs

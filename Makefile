# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)
DEMO := .demo
HOST ?= 127.0.0.1
PORT ?= 8080

# Azurite, the Storage emulator the Table ledger's tests run against: npm, azurite 3.35.0 (3.36 and later
# want Node 22; Debian's and this machine's Node is 20) with every dependency pinned by
# tools/azurite/package-lock.json, installed into tools/azurite/node_modules (not committed).
AZURITE := tools/azurite/node_modules/.bin/azurite-table
AZURITE_STAMP := tools/azurite/node_modules/.installed-$(shell sha256sum tools/azurite/package-lock.json | cut -c1-12)
AZURITE_PORT ?= 10002
# Azurite's published development account (not a secret).
AZURITE_CONNECTION := DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;TableEndpoint=http://127.0.0.1:$(AZURITE_PORT)/devstoreaccount1;

.PHONY: run run-azurite demo test coverage-html mutation format bench tools azurite clean

$(STAMP): requirements.txt requirements-dev.txt
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# openssl and curl are used by the tests and the printed examples; install them where they are missing.
tools:
	@missing=""; for tool in openssl curl; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

$(AZURITE_STAMP): tools/azurite/package.json tools/azurite/package-lock.json
	@command -v npm >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing nodejs and npm"; apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; \
		else echo "please install Node.js and npm (for Azurite)" >&2; exit 1; fi; }
	npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
	touch $(AZURITE_STAMP)

azurite: $(AZURITE_STAMP)

# The HTTP API on the embedded default (keys, ledger and offline DPS under PKI_HOME, default ./.pki).
# A first start creates a root, an intermediate, an admin key and a factory key, and prints them once.
run: $(STAMP) tools
	$(BIN)/python cli.py serve --bootstrap --host $(HOST) --port $(PORT)

# The same API with its ledger (and offline DPS records) in Table Storage on Azurite, in memory: start
# Azurite on AZURITE_PORT, serve until Ctrl-C, stop Azurite. CA keys stay files, under .pki-azurite.
run-azurite: $(STAMP) tools $(AZURITE_STAMP)
	@$(AZURITE) --inMemoryPersistence --tableHost 127.0.0.1 --tablePort $(AZURITE_PORT) --skipApiVersionCheck \
		--disableTelemetry --silent & azurite=$$!; trap 'kill $$azurite' EXIT INT TERM; \
	$(BIN)/python -c "import socket, time; exec('while True:\n try: socket.create_connection((\"127.0.0.1\", $(AZURITE_PORT))).close(); break\n except OSError: time.sleep(0.2)')"; \
	PKI_HOME=.pki-azurite LEDGER_TABLES='$(AZURITE_CONNECTION)' \
		$(BIN)/python cli.py serve --bootstrap --host $(HOST) --port $(PORT)

# The seed's CLI flow end to end on the embedded default, in a scratch PKI home (.demo/).
demo: $(STAMP) tools
	rm -rf $(DEMO)
	mkdir -p $(DEMO)/devices
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-ca-root --out $(DEMO)/root.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py proof-ca-root-possession --verification-code DEMO0123 \
		--out $(DEMO)/verification.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-ca-intermediate --id factory-demo --out $(DEMO)/intermediate.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-device-cert --device-id demo-device-1 \
		--out-dir $(DEMO)/devices/demo-device-1
	openssl verify -CAfile $(DEMO)/root.pem -untrusted $(DEMO)/intermediate.pem \
		$(DEMO)/devices/demo-device-1/device.cert.pem

# Line and branch coverage of shared/ (subprocesses included) must stay over their floors.
COVERAGE_LINES ?= 95
COVERAGE_BRANCHES ?= 85

test: $(STAMP) tools $(AZURITE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine -q
	$(BIN)/coverage report
	$(BIN)/coverage json -q -o .coverage.json
	$(BIN)/python tools/coverage_floor.py .coverage.json --lines $(COVERAGE_LINES) --branches $(COVERAGE_BRANCHES)

# Mutation testing of the security-critical modules ([tool.mutmut] in pyproject.toml): mutmut with one
# Azurite for the whole run, then the score and every survivor (tools/mutation.py; justified survivors are
# in tools/mutation-survivors/). Slow, so not part of make test. MUTANTS="shared.pki* ..." runs only
# the mutants whose names match, in a fresh mutants/ too; `.venv/bin/python tools/mutation.py report`
# prints the last run's report again.
mutation: $(STAMP) $(AZURITE_STAMP)
	rm -rf mutants
	AZURITE_TABLE=$(CURDIR)/$(AZURITE) $(BIN)/python tools/mutation.py run $(MUTANTS)

# The same report as a web page: htmlcov/index.html (after make test).
coverage-html: $(STAMP)
	$(BIN)/coverage html -q && echo "open htmlcov/index.html"

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Each prints ratios against a reference measured in the same run (http_sign installs cfssl if missing).
bench: $(STAMP) tools $(AZURITE_STAMP)
	$(BIN)/python bench/sign_throughput.py
	$(BIN)/python bench/http_sign.py
	$(BIN)/python bench/keyvault_sign.py
	$(BIN)/python bench/ledger_tables.py
	$(BIN)/python bench/batch_sign.py
	$(BIN)/python bench/expiry_scan.py

clean:
	rm -rf $(VENV) $(DEMO) tools/azurite/node_modules .pytest_cache .ruff_cache .coverage .coverage.* .coverage.json htmlcov mutants

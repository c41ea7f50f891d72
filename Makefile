# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)
DEMO := .demo

.PHONY: run demo test lint format bench clean

$(STAMP): requirements.txt requirements-dev.txt
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# The seed's flow end to end on the embedded default, in a scratch PKI home (.demo/).
run demo: $(STAMP)
	rm -rf $(DEMO)
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-ca-root --out $(DEMO)/root.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py proof-ca-root-possession --verification-code DEMO0123 \
		--out $(DEMO)/verification.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-ca-intermediate --id factory-demo --out $(DEMO)/intermediate.pem
	PKI_HOME=$(DEMO)/pki $(BIN)/python cli.py create-device-cert --device-id demo-device-1 \
		--out-dir $(DEMO)/devices/demo-device-1
	openssl verify -CAfile $(DEMO)/root.pem -untrusted $(DEMO)/intermediate.pem \
		$(DEMO)/devices/demo-device-1/device.cert.pem

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/sign_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache

# Third-party MLLP senders for tests/interop (Makefile fragment).
#
# Include it from the top-level Makefile, after BIN is defined:
#     include tests/interop/interop.mk
# and make the test target depend on interop-deps, e.g. `test: $(BIN)/.installed interop-deps`.
# Without node_modules the JavaScript interop tests are skipped; the mllp-https one needs only its PyPI
# package, which '.[test]' installs.
#
# Needs Node.js >= 20.19 and npm on PATH; the npm packages are pinned in package-lock.json.

BIN ?= .venv/bin
INTEROP_DIR := tests/interop
.PHONY: interop-deps

interop-deps: $(INTEROP_DIR)/node_modules

# npm ci only when node_modules is missing or older than the lockfile (or package.json).
$(INTEROP_DIR)/node_modules: $(INTEROP_DIR)/package-lock.json $(INTEROP_DIR)/package.json
	npm ci --prefix $(INTEROP_DIR) --no-audit --no-fund
	touch $@

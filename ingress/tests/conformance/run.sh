#!/usr/bin/env bash
# API conformance: schemathesis (PyPI) generates requests from the OpenAPI document a real
# `keel serve` publishes (GET /v1/openapi.json) and checks every answer against it: no 5xx
# (other than documented overload), every status, header, content type and body as documented,
# auth enforced, invalid data refused, valid data accepted. Called by `make test`.
#
# Usage: KEEL_BIN=path/to/keel ingress/tests/conformance/run.sh
# Bounded: --max-examples per operation and --max-time for the whole run.
set -euo pipefail

keel="${KEEL_BIN:?set KEEL_BIN to the keel binary}"
max_examples="${CONFORMANCE_MAX_EXAMPLES:-60}"
max_time="${CONFORMANCE_MAX_TIME_SECS:-600}"
schemathesis="$(command -v schemathesis || true)"
if [[ -z "$schemathesis" ]]; then
    schemathesis="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/schemathesis"
fi
if [[ ! -x "$schemathesis" ]]; then
    echo "conformance: schemathesis is not installed (make deps-test installs it)" >&2
    exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/keel-conformance.XXXXXX")"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

key="$("$keel" keys add --file "$work/keys.json" --id conformance --scopes write,read,admin 2>/dev/null)"
RUST_LOG=warn "$keel" serve --data "$work/data" --listen 127.0.0.1:0 \
    --auth-keys "$work/keys.json" >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
url=""
for _ in $(seq 1 300); do
    url="$(sed -n 's/^keel: listening on //p' "$work/stdout")"
    [[ -n "$url" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/stderr" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$url" ]] || { echo "conformance: keel serve did not listen within 30 s" >&2; exit 1; }

# The subscription stream never ends by design; tests/subscribe.rs covers it.
# Phases: examples and fuzzing. The coverage phase stops with an internal error of the tool on
# this machine's Python 3.11 ("AST constructor recursion depth mismatch" inside hypothesis'
# lambda-source inspection), which fails the run without testing anything more.
status=0
"$schemathesis" run "$url/v1/openapi.json" \
    --header "Authorization: Bearer $key" \
    --checks all \
    --phases examples,fuzzing \
    --exclude-path /v1/subscribe \
    --max-examples "$max_examples" \
    --max-time "$max_time" \
    --request-timeout 10 \
    --seed 20261201 \
    --workers 2 \
    --no-color || status=$?
if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "conformance: keel serve died during the run" >&2
    cat "$work/stderr" >&2
    exit 1
fi
if grep -q "panicked" "$work/stderr"; then
    echo "conformance: keel serve logged a panic" >&2
    cat "$work/stderr" >&2
    exit 1
fi
exit "$status"

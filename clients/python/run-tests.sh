#!/usr/bin/env bash
# Installs keel-client into a throwaway virtualenv and runs its tests against a real
# `keel serve` (KEEL_BIN, default ~/.cache/keel-target/release/keel). Exit status: the tests'.
# Called from `make test`; needs python3 >= 3.9 with venv. No network when the interpreter has
# setuptools >= 61 (the build then runs without isolation); otherwise pip fetches setuptools
# from PyPI for the build. The package itself has no dependencies.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
export KEEL_BIN="${KEEL_BIN:-$HOME/.cache/keel-target/release/keel}"
# A missing server binary is a failure here, not a skip.
export KEEL_REQUIRE_SERVER=1
export PYTHONDONTWRITEBYTECODE=1

if [[ ! -x "$KEEL_BIN" ]]; then
    echo "run-tests.sh: KEEL_BIN=$KEEL_BIN is not an executable (build it first: cargo build --release)" >&2
    exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/keel-client-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m venv --system-site-packages "$work/venv"
venv_python="$work/venv/bin/python"

# First without network (the interpreter's own setuptools >= 61 and wheel, if it has them),
# then the standard isolated build (pip fetches setuptools and wheel from PyPI).
# The build runs on a copy: an in-tree build would leave build/ and *.egg-info in the repo.
mkdir "$work/pkg"
cp -R "$here/pyproject.toml" "$here/README.md" "$here/src" "$work/pkg/"
pip_install=("$venv_python" -m pip install --quiet --disable-pip-version-check --no-deps)
if ! "${pip_install[@]}" --no-build-isolation "$work/pkg" >"$work/pip-offline.log" 2>&1; then
    "${pip_install[@]}" "$work/pkg"
fi

# Run from outside the source tree so that the INSTALLED package is what the tests import.
cd "$work"
"$venv_python" - <<'PY'
import keel_client, sys
print(f"keel_client {keel_client.__version__} from {keel_client.__file__}; python {sys.version.split()[0]}")
assert "/venv/" in keel_client.__file__, "tests must run against the installed package"
PY
echo "KEEL_BIN=$KEEL_BIN"
"$venv_python" -m unittest discover -s "$here/tests" -t "$here/tests" -v

#!/usr/bin/env bash
# The project's one test command (README, CI): the Rust tests, then the Python package built
# into a fresh virtual environment and its pytest suite.
#
# `cargo test` compiles the Python module too (feature `python` of deltatune-py), so that the
# features of shared dependencies (syn's, via PyO3's macros) are those of the wheel build; the wheel
# is then built with cargo's dev profile into the same target directory and reuses every compiled
# dependency but PyO3's (`pip install .` without these settings builds a release wheel).
# Set DELTATUNE_SKIP_RUST=1 to run only the Python part.
set -euo pipefail
cd "$(dirname "$0")/.."

# The serve crate's page test drives Debian's headless Chromium; install it when it is missing and
# this user may (it skips with a printed reason otherwise). DELTATUNE_NO_CHROMIUM=1 skips this.
if [ -z "${DELTATUNE_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (Debian package) for the serve page test"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; then
        echo "chromium could not be installed; the page test will skip"
    fi
fi

# Data-parallel training is behind the cargo feature `mpi` (Open MPI + libclang, installed by
# scripts/setup-mpi.sh where this user may); its tests run with the feature when mpicc is there,
# and without it the build still works and they skip with a printed reason.
# DELTATUNE_NO_MPI=1 skips this.
features="deltatune-py/python"
if [ -z "${DELTATUNE_NO_MPI:-}" ] && scripts/setup-mpi.sh; then
    features="$features,deltatune-cli/mpi"
else
    echo "building without MPI: the data-parallel (mpirun) tests will skip"
fi

if [ -z "${DELTATUNE_SKIP_RUST:-}" ]; then
    cargo test --workspace --features "$features"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
python="${PYTHON:-python3}"
venv="$CARGO_TARGET_DIR/python-test-venv"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
MATURIN_PEP517_ARGS="--profile dev" \
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ".[test]"
# The CLI built by `cargo test` above, for the tests that compare with it (skipped without it).
if [ -x "$CARGO_TARGET_DIR/debug/deltatune" ]; then
    export DELTATUNE_CLI="$CARGO_TARGET_DIR/debug/deltatune"
fi
cd crates/deltatune-py/tests
"$venv/bin/python" -m pytest -q -rs -p no:cacheprovider .

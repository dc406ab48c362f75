#!/usr/bin/env bash
# Installs what data-parallel training (cargo feature `mpi`) builds and runs with: Open MPI (the
# library, its compiler wrapper `mpicc` and `mpirun`) and libclang (the MPI bindings are generated
# at build time). Debian/Ubuntu packages; needs root. Prints what it did; exits 0 when everything
# is there afterwards, 1 otherwise.
#
#   scripts/setup-mpi.sh && cargo build --release --features deltatune-cli/mpi
#   mpirun -np 2 target/release/deltatune --threads 1 train ...
set -uo pipefail

have() {
    command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 \
        && { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1; }
}

if have; then
    echo "MPI: Open MPI and libclang are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "MPI: not installed, and this is not a Debian system run as root; install an MPI library with mpicc, and libclang, by hand"
    exit 1
fi
pkgs=(openmpi-bin libopenmpi-dev libclang-dev)
echo "MPI: installing ${pkgs[*]} (Debian packages)"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1
fi
if have; then
    echo "MPI: installed"
    exit 0
fi
echo "MPI: could not be installed"
exit 1

#!/usr/bin/env bash
# Creates the virtual environment and installs what iSM needs.
# Installs missing Debian packages with apt-get when running as root.
#
#   scripts/bootstrap.sh VENV          what running iSM needs (make demo)
#   scripts/bootstrap.sh VENV test     also what the test suite needs: SoftHSM2 and swtpm (real PKCS#11
#                                      and TPM 2.0 devices), the TSS headers tpm2-pytss builds against,
#                                      clang and lld for the C example, and the development tools (make test)
set -euo pipefail
venv=${1:-.venv}
mode=${2:-runtime}
python=${PYTHON:-python3}

need_apt=()
command -v "$python" >/dev/null 2>&1 || need_apt+=(python3)
if command -v "$python" >/dev/null 2>&1 && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need_apt+=(python3-venv)
fi
if [[ $mode == test ]]; then
    # SoftHSM2: the PKCS#11 token the pkcs11 key-store backend is tested against.
    command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
    # swtpm: the software TPM 2.0 the tpm key-store backend is tested against.
    command -v swtpm >/dev/null 2>&1 || need_apt+=(swtpm)
    # tpm2-pytss (the tpm backend) builds from source against the TPM2 TSS: headers, pkg-config, a C compiler.
    pkg-config --exists tss2-esys >/dev/null 2>&1 || need_apt+=(libtss2-dev)
    command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
    command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
    # clang + lld (wasm-ld): the C example microservice (examples/sealed-counter) is built for wasm32
    # and include/ism.h is compiled by the tests; make demo does not need them.
    command -v clang >/dev/null 2>&1 || need_apt+=(clang)
    command -v wasm-ld >/dev/null 2>&1 || need_apt+=(lld)
    has_headers='import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
    if command -v "$python" >/dev/null 2>&1 && ! "$python" -c "$has_headers" >/dev/null 2>&1; then
        need_apt+=(python3-dev)
    fi
fi
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian packages: ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    else
        echo "bootstrap: missing ${need_apt[*]}; install them (e.g. sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: Python >= 3.11 required, found {sys.version.split()[0]}")
PY

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [[ $mode == test ]]; then
    echo "bootstrap: installing iSM, the tpm backend and the development tools into $venv"
    "$venv/bin/python" -m pip install -q -e '.[dev,tpm]'
else
    echo "bootstrap: installing iSM into $venv"
    "$venv/bin/python" -m pip install -q -e .
fi

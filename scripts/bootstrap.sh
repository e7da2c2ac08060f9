#!/usr/bin/env bash
# Creates the virtual environment and installs what iSM needs.
# Installs missing Debian packages with apt-get when running as root.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

need_apt=()
command -v "$python" >/dev/null 2>&1 || need_apt+=(python3)
if command -v "$python" >/dev/null 2>&1 && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need_apt+=(python3-venv)
fi
# SoftHSM2: the PKCS#11 token the pkcs11 key-store backend is tested against.
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
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
echo "bootstrap: installing iSM and its development tools into $venv"
"$venv/bin/python" -m pip install -q -e '.[dev]'

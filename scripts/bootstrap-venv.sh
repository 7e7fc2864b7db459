#!/bin/sh
# Create the project's virtual environment. On a fresh Debian machine the
# interpreter may lack the venv module (package python3-venv); install it
# when we can (root, or passwordless sudo) instead of failing with a riddle.
set -eu
python="$1"
venv="$2"
if "$python" -m venv "$venv" 2>/dev/null; then
    exit 0
fi
rm -rf "$venv"
echo "python3 -m venv failed; installing the Debian venv package" >&2
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo -n"; else
    echo "run: apt-get install python3-venv (as root), then retry" >&2; exit 1
fi
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
$sudo apt-get update -q
$sudo apt-get install -y -q "python${version}-venv" || $sudo apt-get install -y -q python3-venv
"$python" -m venv "$venv"

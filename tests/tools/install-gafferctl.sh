#!/usr/bin/env bash
# install-gafferctl.sh: put the original gaffer 0.4.4 command-line client
# (gafferctl, Python 2.7) into a virtualenv, so the test suite can drive
# gafferd with the real client of the API it speaks.
#
#   usage: tests/tools/install-gafferctl.sh [DIR]
#          DIR defaults to ${TMPDIR:-/tmp}/gafferctl-venv
#   prints: the path of DIR/bin/gafferctl, on the last line of stdout
#   exit:   0 on success, 2 when no Python 2.7 is found, else pip's status
#
# Needs a Python 2.7 (pyenv's 2.7.*, python2.7 on PATH, or PY27=/path),
# a C compiler (pyuv and psutil build from source) and access to PyPI.
# A DIR finished by an earlier run is reused; one an interrupted run left
# behind is rebuilt.  Concurrent runs for one DIR wait for each other.
set -euo pipefail

dir=${1:-${TMPDIR:-/tmp}/gafferctl-venv}
dir=${dir%/}

# A DIR counts as installed only once the last step has marked it.
works() { [ -f "$1/.installed" ] && [ -x "$1/bin/gafferctl" ]; }

find_py27() {
    if [ -n "${PY27:-}" ]; then echo "$PY27"; return; fi
    local p
    for p in "$HOME"/.pyenv/versions/2.7*/bin/python2.7 "$(command -v python2.7 || true)"; do
        if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return; fi
    done
}

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

if works "$dir"; then echo "$dir/bin/gafferctl"; exit 0; fi

py27=$(find_py27)
if [ -z "$py27" ] || ! "$py27" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
    echo "install-gafferctl: no Python 2.7 found (install one, or set PY27=/path/to/python2.7)" >&2
    exit 2
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
rm -rf "$dir"

# virtualenv 16 is the last release that runs on 2.7 and needs no wheels
# from the network to seed the environment.
"$py27" -m pip install -q --target "$tools" "virtualenv==16.7.12" >&2
PYTHONPATH=$tools "$py27" -m virtualenv -q --no-download "$dir" >&2

# gaffer 0.4.4 was written against pyuv 0.9, which PyPI no longer has;
# 0.8.3 is the newest that gaffer's event loop still runs on.  tornado 2.4
# is the HTTP client it was released with; psutil 0.6 has the API it calls.
"$dir/bin/pip" install -q "pyuv==0.8.3" "psutil==0.6.1" "tornado==2.4" \
    "six<1.17" "colorama<0.4.7" "setproctitle<1.2" >&2
"$dir/bin/pip" install -q --no-deps "gaffer==0.4.4" >&2

"$dir/bin/python" -c 'import gaffer.httpclient' >&2
touch "$dir/.installed"
echo "$dir/bin/gafferctl"

#!/bin/sh
# Make the venv bench/llm_sandbox.py measures llm-sandbox (Podman backend) in: its own, never
# the project's .venv. Idempotent: reuses the venv and does nothing more when the pinned version
# is already there.
#
#     bash bench/setup-llm-sandbox.sh        # then: .venv/bin/python bench/llm_sandbox.py
set -eu
VERSION=0.3.46                     # keep equal to LLM_SANDBOX_VERSION in bench/llm_sandbox.py
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${BENCH_VENV:-$ROOT/.bench-venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if "$VENV/bin/python" -I -c "import podman; from importlib.metadata import version; \
import sys; sys.exit(version('llm-sandbox') != '$VERSION')" 2>/dev/null; then
    echo "llm-sandbox $VERSION is already in $VENV"
    exit 0
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "llm-sandbox[podman]==$VERSION"
"$VENV/bin/python" -I -c "import llm_sandbox, podman; from importlib.metadata import version; \
print('llm-sandbox', version('llm-sandbox'), 'podman-py', version('podman'), 'in $VENV')"

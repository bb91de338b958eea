#!/usr/bin/env bash
# Install Bagpipe and its test dependencies. torch==2.13.0 is installed first when
# torch is absent: it is a local CPU build here, while an unpinned torch would pull
# a CUDA build of several GB. The package itself only asks for a torch range.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"

#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the CPU test suite. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m heavy` for the large cases kept out of the default run).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"

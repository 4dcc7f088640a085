#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the quick benchmark (`metric-kernels bench --quick`: every loss
# and every provider usable here; under 3 minutes on a 2-core CPU). It prints the table and writes results.csv,
# results.json, results.md and PNG plots into out/bench/. Extra arguments go to the benchmark (e.g. --full,
# --out DIR). The parity report against PML is `metric-kernels parity`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec metric-kernels bench --quick "$@"

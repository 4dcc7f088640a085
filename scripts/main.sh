#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs `metric-kernels parity` (until the benchmark lands, the report of
# every loss's reference against pytorch-metric-learning in float64, on the CPU). Extra arguments go to the command.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec metric-kernels parity "$@"

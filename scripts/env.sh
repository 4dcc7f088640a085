# Sourced by scripts/main.sh and scripts/test.sh: makes .venv (once), installs the pinned tools and this package
# (editable, without build isolation so it builds against the torch it will import), then activates it.
# METRIC_KERNELS_TORCH picks the torch requirement (default torch==2.13.0, the CPU build these machines have on disk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${METRIC_KERNELS_VENV:-$ROOT/.venv}"
TORCH_REQUIREMENT="${METRIC_KERNELS_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.metric_kernels_stamp"
# Reinstall when the requirements, the build description or the native sources change (the editable install
# builds metric_kernels._C in place).
want="$(cat "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/CMakeLists.txt" \
        $(find "$ROOT/csrc" -type f | sort) | sha256sum | cut -d' ' -f1) $TORCH_REQUIREMENT"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[env] installing $TORCH_REQUIREMENT, the test tools and metric_kernels into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_REQUIREMENT"
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt" "$TORCH_REQUIREMENT"
    # The native extension must build here (a failed build would only make backend="cpu" unavailable otherwise).
    METRIC_KERNELS_REQUIRE_EXT="${METRIC_KERNELS_REQUIRE_EXT:-1}" MAX_JOBS="${MAX_JOBS:-2}" \
        "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"

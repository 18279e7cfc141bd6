#!/usr/bin/env bash
# The prepared accelerator check of issue 12, for a fresh GPU machine whose image has jax, flax,
# optax, orbax and numpy but not grain, array-record or ml_collections. Run from the repository
# root (the device tool's working directory), carrying the wheels that
# benchmarks/fetch_accelerator_wheels.sh put in .whl/accelerator_check:
#
#   bash benchmarks/accelerator_check.sh            # full size; ends within 8 minutes
#   bash benchmarks/accelerator_check.sh --smoke    # tiny model, e.g. on a CPU
#
# Arguments go to benchmarks/accelerator_check.py (its docstring lists the phases). The tables
# are printed at the end and written to $OUT/accelerator_check.md when OUT is set.
# ACCELERATOR_CHECK_SCRIPT runs another benchmark the same way, with the same wheels, e.g.
#   ACCELERATOR_CHECK_SCRIPT=benchmarks/bench_backward_paths.py bash benchmarks/accelerator_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl/accelerator_check
SITE=/tmp/accelerator_check_site
if [ -d "$WHEELS" ]; then
  # One package at a time, so one missing wheel (another Python version) costs only itself.
  for pkg in ml_collections portpicker array_record grain; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" --find-links "$WHEELS" "$pkg" >/dev/null 2>&1 \
      || echo "accelerator_check: no wheel of $pkg in $WHEELS for $("$PY" -V)"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "accelerator_check: no $WHEELS (benchmarks/fetch_accelerator_wheels.sh makes it)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The script keeps its own deadlines (--budget_s, 450 s by default); this is the backstop, and
# SIGINT still prints the tables. A longer --budget_s needs ACCELERATOR_CHECK_TIMEOUT_S too.
exec timeout --signal=INT --kill-after=15 "${ACCELERATOR_CHECK_TIMEOUT_S:-470}" "$PY" "${ACCELERATOR_CHECK_SCRIPT:-benchmarks/accelerator_check.py}" "$@"

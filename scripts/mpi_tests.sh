#!/usr/bin/env bash
# The sharded table (feature `mpi`) under mpirun on one machine: the test
# program tests/sharded.rs on 1, 2, 3 and 4 ranks (equivalence with one
# process, error propagation, N -> M checkpoints), the doctests with the
# feature, then the sharded recommender on 2 ranks against the one-process
# recall.
#
#   scripts/mpi_tests.sh            # all of it
#   MPI_RANKS="2 4" scripts/mpi_tests.sh
#
# Needs Open MPI (mpirun) and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# --oversubscribe: more ranks than cores (CI machines have 2).
mpirun=(mpirun --oversubscribe)
if [ "$(id -u)" = 0 ]; then
  mpirun+=(--allow-run-as-root)
fi

built=$(cargo test --release --features mpi --test sharded --no-run 2>&1 | tee /dev/stderr)
test_program=$(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' <<<"$built")
if [ ! -x "$test_program" ]; then
  echo "cannot find the sharded test program in cargo's output" >&2
  exit 1
fi
cargo build --release --features mpi --example sharded_recommender
# The doctests with the feature on: the README's sharded example is compiled
# (no_run; without the feature it is an empty program).
cargo test --release --features mpi --doc

for n in ${MPI_RANKS:-1 2 3 4}; do
  echo "== tests/sharded.rs on $n ranks"
  # A rank left waiting would hang the job: the timeout turns that into a failure.
  timeout 300 "${mpirun[@]}" -np "$n" "$test_program"
done

echo "== the sharded recommender on 2 ranks against one process"
timeout 600 "${mpirun[@]}" -np 2 "${CARGO_TARGET_DIR:-target}"/release/examples/sharded_recommender \
  --users 4000 --items 8000 --epochs 2 --check-one-process

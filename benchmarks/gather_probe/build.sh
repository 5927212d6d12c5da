#!/bin/bash
# Builds the probe into DIR (default ./build): one object per variant, compiled in parallel.
# Variant: name, tile M N K, cluster M N, cooperative, kind (0 sorted copy, 1 cp.async, 2 TMA rows).
set -e
D=${1:-build}; mkdir -p "$D"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(python3 -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
FLAGS="-std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr"
VARIANTS=("sorted_128x192_c1x2 128 192 64 1 2 false 0" "cp_async_128x192_c1x2 128 192 64 1 2 false 1"
          "cp_async_128x256_coop 128 256 64 1 1 true 1" "tma_rows_128x192_c1x2 128 192 64 1 2 false 2"
          "tma_rows_128x256_coop 128 256 64 1 1 true 2")
: > "$D/variants.h"; LIST=""; pids=()
for v in "${VARIANTS[@]}"; do
  set -- $v
  nvcc $FLAGS -c -I"$HERE" -I"$HERE/../../templates" -I"$ROOT/include" -I"$ROOT/tools/util/include" \
    -DNAME=$1 -DTM=$2 -DTN=$3 -DTK=$4 -DCM=$5 -DCN=$6 -DCOOP=$7 -DKIND=$8 -o "$D/$1.o" "$HERE/variant.cu" &
  pids+=($!)
  echo "DECL($1)" >> "$D/variants.h"; LIST="$LIST {\"$1\", $1_run, $1_err, $8},"
done
echo "#define VARIANT_LIST $LIST" >> "$D/variants.h"
nvcc $FLAGS -c -I"$D" -o "$D/main.o" "$HERE/main.cu" & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
nvcc -gencode=arch=compute_90a,code=sm_90a -o "$D/probe" "$D"/*.o

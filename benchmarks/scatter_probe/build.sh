#!/bin/bash
# Builds the probe into DIR (default ./build): one object per variant, compiled in parallel.
# Variant: name, tile M N K, cluster M N, cooperative, epilogue (0 store, 3 scatter-add), red width.
set -e
D=${1:-build}; mkdir -p "$D"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(python3 -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
FLAGS="-std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr"
VARIANTS=${VARIANTS:-"store_128x256_c1x2_coop 128 256 64 1 2 true 0 2;scatter2_128x256_c1x2_coop 128 256 64 1 2 true 3 2;scatter4_128x256_c1x2_coop 128 256 64 1 2 true 3 4;store_64x256_pp 64 256 64 1 1 false 0 2;scatter2_64x256_pp 64 256 64 1 1 false 3 2;scatter4_64x256_pp 64 256 64 1 1 false 3 4"}
IFS=';' read -ra VS <<< "$VARIANTS"
: > "$D/variants.h"; LIST=""; pids=()
for v in "${VS[@]}"; do
  set -- $v
  nvcc $FLAGS -c -I"$HERE" -I"$HERE/../../templates" -I"$ROOT/include" -I"$ROOT/tools/util/include" \
    -DNAME=$1 -DTM=$2 -DTN=$3 -DTK=$4 -DCM=$5 -DCN=$6 -DCOOP=$7 -DEPI=$8 -DSCATTER_VEC=$9 -o "$D/$1.o" "$HERE/variant.cu" &
  pids+=($!)
  echo "DECL($1)" >> "$D/variants.h"; LIST="$LIST {\"$1\", $1_run, $1_err, $8 == 3},"
done
echo "#define VARIANT_LIST $LIST" >> "$D/variants.h"
nvcc $FLAGS -c -I"$D" -o "$D/main.o" "$HERE/main.cu" & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
nvcc -gencode=arch=compute_90a,code=sm_90a -o "$D/probe" "$D"/*.o

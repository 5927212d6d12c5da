// What every grouped-GEMM generation shares about its epilogue: the kinds, numbered as
// autotune/codegen.py writes them, and the relu2 activation (CUTLASS 3.x on sm90/sm100 applies it
// through LinCombEltAct, CUTLASS 2.x on sm80/sm89 through LinearCombinationGeneric).
#pragma once

#include "cutlass/array.h"
#include "cutlass/cutlass.h"

namespace autotune {

enum EpilogueKind : int { kIdentity = 0, kRelu2 = 1, kFloat32Out = 2 };

// relu(x)^2 of Nemotron 3's non-gated experts, applied to the fp32 accumulator in the epilogue.
// NaN propagates (NaN < 0 is false), as torch.relu does.
template <class T>
struct Relu2 {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE T operator()(T const& v) const {
    T r = v < T(0) ? T(0) : v;
    return r * r;
  }
};

template <class T, int N>
struct Relu2<cutlass::Array<T, N>> {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& frag) const {
    cutlass::Array<T, N> out;
    Relu2<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = op(frag[i]);
    return out;
  }
};

}  // namespace autotune

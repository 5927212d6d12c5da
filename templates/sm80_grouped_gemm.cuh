// sm80/sm89 grouped GEMM (CUTLASS 2.x GemmGrouped): D_g = A_g @ B_g^T per group, row-major.
//
// Same C ABI as sm90_grouped_gemm.cuh, so autotune/runtime.py loads either. The problem sizes,
// leading dimensions and operand pointers are written into the workspace by a setup kernel on
// the caller's stream; GroupScheduleMode::kDeviceOnly makes the kernel read the sizes from device
// memory, so nothing is precomputed on the host and a call never synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "epilogues.cuh"
#include "grouped_gemm_common.cuh"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_generic.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

namespace autotune::sm80 {

// The epilogue of each kind as a CUTLASS 2.x thread-level operator on 128-bit vectors of D.
template <int Kind, class Element>
struct EpilogueOf {  // D = acc, stored in Element
  using ElementD = Element;
  using Op = cutlass::epilogue::thread::LinearCombination<
      Element, 128 / cutlass::sizeof_bits<Element>::value, float, float>;
};

template <class Element>
struct EpilogueOf<kRelu2, Element> {  // D = relu(acc)^2, stored in Element
  using ElementD = Element;
  using Op = cutlass::epilogue::thread::LinearCombinationGeneric<
      Relu2, Element, 128 / cutlass::sizeof_bits<Element>::value, float, float>;
};

template <class Element>
struct EpilogueOf<kFloat32Out, Element> {  // D = acc, stored in fp32 (router logits)
  using ElementD = float;
  using Op = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;
};

template <class G>
struct GroupArgs {
  cutlass::gemm::GemmCoord* sizes;
  int64_t *lda, *ldb, *ldd;
  typename G::Element **a, **b;
  typename G::ElementD** d;

  __device__ void set(int g, int m, int n, int k, const void* pa, const void* pb, void* pd) {
    using Element = typename G::Element;
    sizes[g] = cutlass::gemm::GemmCoord(m, n, k);
    lda[g] = k;  // A [M, K] row-major
    ldb[g] = k;  // B [N, K] row-major, read as K x N column-major
    ldd[g] = n;  // D [M, N] row-major
    a[g] = const_cast<Element*>(static_cast<const Element*>(pa));
    b[g] = const_cast<Element*>(static_cast<const Element*>(pb));
    d[g] = static_cast<typename G::ElementD*>(pd);
  }
};

template <class Element_, int TbM, int TbN, int TbK, int WarpM, int WarpN, int Stages, int Kind>
struct GroupedGemm
    : GroupedGemmEntry<GroupedGemm<Element_, TbM, TbN, TbK, WarpM, WarpN, Stages, Kind>> {
  using Element = Element_;
  using ElementD = typename EpilogueOf<Kind, Element>::ElementD;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  // Ampere's bf16/fp16 tensor-core instruction; Ada runs the same code.
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  using Epilogue = typename EpilogueOf<Kind, Element>::Op;
  // C has D's type: beta is 0 and D stands in for C (C is never read).
  using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignment, Element,
      cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignment, ElementD,
      cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<TbM, TbN, TbK>, cutlass::gemm::GemmShape<WarpM, WarpN, TbK>,
      Instruction, Epilogue, cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,
      Stages, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<GemmKernel>;

  struct Layout {
    size_t sizes, lda, ldb, ldd, a, b, d, total;
  };

  static Layout layout(int groups) {
    Layout l{};
    size_t at = 0;
    auto take = [&](size_t bytes) { size_t here = at; at = align_up(at + bytes, 128); return here; };
    l.sizes = take(sizeof(cutlass::gemm::GemmCoord) * groups);
    l.lda = take(sizeof(int64_t) * groups);
    l.ldb = take(sizeof(int64_t) * groups);
    l.ldd = take(sizeof(int64_t) * groups);
    l.a = take(sizeof(void*) * groups);
    l.b = take(sizeof(void*) * groups);
    l.d = take(sizeof(void*) * groups);
    l.total = at;
    return l;
  }

  static GroupArgs<GroupedGemm> group_args(uint8_t* ws, const Layout& l) {
    return {reinterpret_cast<cutlass::gemm::GemmCoord*>(ws + l.sizes),
            reinterpret_cast<int64_t*>(ws + l.lda), reinterpret_cast<int64_t*>(ws + l.ldb),
            reinterpret_cast<int64_t*>(ws + l.ldd), reinterpret_cast<Element**>(ws + l.a),
            reinterpret_cast<Element**>(ws + l.b), reinterpret_cast<ElementD**>(ws + l.d)};
  }

  // The kDeviceOnly scheduler needs no workspace of its own beyond the argument arrays.
  static size_t workspace_size(int groups, int sm_count) {
    if (groups <= 0 || sm_count <= 0) return 0;
    return layout(groups).total;
  }

  static int threadblocks(int sm_count) {
    static int per_sm = 0;  // occupancy query: host work, once per process
    if (per_sm == 0) per_sm = Gemm::maximum_active_blocks();
    return per_sm > 0 ? per_sm * sm_count : 0;
  }

  template <class Fill>
  static int launch(int groups, void* workspace, size_t workspace_bytes, int sm_count,
                    Schedule sched, cudaStream_t stream, Fill fill) {
    if (sm_count <= 0) return fail(kBadArgument, "sm_count must be > 0");
    // CUTLASS 2.x fixes the threadblock swizzle at compile time: no runtime schedule.
    if (sched.raster != 0 || sched.swizzle != 1)
      return fail(kBadArgument, "sm80/sm89 kernels take only raster 0 and swizzle 1");
    Layout l = layout(groups);
    if (workspace == nullptr || workspace_bytes < l.total)
      return fail(kWorkspaceTooSmall, "workspace smaller than workspace_size()");
    auto* ws = static_cast<uint8_t*>(workspace);
    auto g = group_args(ws, l);
    fill(g);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
      return fail(kLaunchFailed, "setup kernel launch", cudaGetErrorString(e));
    int blocks = threadblocks(sm_count);
    if (blocks <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    typename Epilogue::Params epilogue(1.0f, 0.0f);
    // beta = 0: C is never read; D stands in for it.
    typename Gemm::Arguments args(g.sizes, groups, blocks, epilogue, g.a, g.b, g.d, g.d, g.lda,
                                  g.ldb, g.ldd, g.ldd, nullptr);
    Gemm gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess)
      return fail(kInitializeFailed, "CUTLASS initialize failed");
    cutlass::Status s = gemm.run(stream);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || s != cutlass::Status::kSuccess)
      return fail(kLaunchFailed, "grouped GEMM launch", cudaGetErrorString(e));
    return kOk;
  }
};

}  // namespace autotune::sm80

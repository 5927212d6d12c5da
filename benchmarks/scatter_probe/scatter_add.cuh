// The scatter-add epilogue of the probe (measured in NOTES v17, not shipped): each row of an
// expert's down-GEMM output, scaled by its routing weight, is added into its token's fp32 row
// with red.global.add, so the per-(token, pick) rows are never written and no combine reads them.
//
// Group g's D pointer is a row cursor, not an output: (ptr_D[g] - d_base) / N is the sorted
// position of the group's first row (the routing kernel writes the pointers as for a stored
// output, with d_base in place of that output). Sorted row r belongs to pair pair_of_row[r] =
// token * top_k + pick and is added, times pair_weight[pair], into out[token, :].
//
// The sum's order over a token's picks follows the CTAs' timing: the result may differ from run
// to run by fp32 rounding (not bit-reproducible), unlike the combine kernel's fixed order.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"

namespace probe {

// The epilogue's inputs: where each sorted row goes and with which weight, and the fp32 rows it
// adds into.
struct ScatterArgs {
  const void* d_base = nullptr;          // the D pointers' base: (d - d_base) / N = first row
  const int32_t* pair_of_row = nullptr;  // [rows] token * top_k + pick of each sorted row
  const float* pair_weight = nullptr;    // [tokens * top_k] routing weights
  float* out = nullptr;                  // [tokens, ld_out] fp32, zero before the GEMM
  int top_k = 0;
  int64_t ld_out = 0;
};

// What the epilogue reads besides the accumulators (the kernel's epilogue "thread" arguments;
// alpha and beta are there because the shared argument builder sets them, and are unused).
struct ScatterAddThread {
  float alpha = 1.0f, beta = 0.0f;
  ScatterArgs scatter{};
};

// An operator-style epilogue (CUTLASS's DefaultEpilogueArray interface), run by the ptr-array
// kernels through Sm90TmaWarpSpecializedAdapter: no shared memory and no TMA store, so the
// mainloop gets the epilogue's shared memory for stages.
template <class ElementD_, class StrideD_>
class ScatterAddEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementOutput = float;
  using ElementD = ElementD_;  // the pointer type of the row cursors
  using ElementC = void;
  using GmemElementC = ElementD;
  using StrideD = StrideD_;
  using StrideC = StrideD_;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using InternalStrideC = InternalStrideD;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(cute::get<1>(InternalStrideD{}))>,
                                cute::Int<1>>,
                "scatter-add needs row-major D (a kernel without swap-AB)");

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ScatterAddThread thread{};
    GmemElementC const** ptr_C = nullptr;
    StrideC dC{};
    ElementD** ptr_D = nullptr;
    StrideD dD{};
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int = 0) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    ScatterArgs const& s = args.thread.scatter;
    return s.pair_of_row != nullptr && s.pair_weight != nullptr && s.out != nullptr &&
           s.d_base != nullptr && s.top_k > 0;
  }

  CUTLASS_HOST_DEVICE ScatterAddEpilogue(Params const& params) : params(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    ScatterArgs const& s = params.thread.scatter;
    int64_t row0 = (params.ptr_D[l_coord] - static_cast<ElementD const*>(s.d_base)) / N;

    Tensor cD = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                           make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);  // ((2,2,V),MMA_M,MMA_N)
    // wgmma's fp32 accumulator layout: per 8-column group a thread holds two neighbouring
    // columns (mode 0,0) of two rows eight apart (mode 0,1), hence one 8-byte red per pair.
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 &&
                  size<0, 1>(FrgLayout{}) == 2, "expected the sm90 wgmma accumulator layout");
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < size<1>(tCcD); ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        int m = get<0>(tCcD(make_coord(make_coord(0, h, 0), mm, 0)));
        // No early exit: the shuffles below need every lane of the warp.
        bool row_ok = m < M;
        int pair = row_ok ? s.pair_of_row[row0 + m] : 0;
        float w = row_ok ? s.pair_weight[pair] : 0.0f;
        float* dst = s.out + int64_t(pair / s.top_k) * s.ld_out;
        CUTLASS_PRAGMA_UNROLL
        for (int nn = 0; nn < size<2>(tCcD); ++nn) {
#if SCATTER_VEC == 4
          // Two 8-column groups (16 columns, one quad of lanes) regrouped by shuffles so that
          // lane q of the quad adds columns 4q..4q+3: one 16-byte red instead of two 8-byte ones.
          int q = thread_idx % 4, src = (thread_idx & ~3) | (2 * (q % 2));
          CUTLASS_PRAGMA_UNROLL
          for (int v = 0; v < size<0, 2>(tCcD); v += 2) {
            auto a0 = make_coord(make_coord(0, h, v), mm, nn);
            auto a1 = make_coord(make_coord(1, h, v), mm, nn);
            auto b0 = make_coord(make_coord(0, h, v + 1), mm, nn);
            auto b1 = make_coord(make_coord(1, h, v + 1), mm, nn);
            float lo0 = __shfl_sync(0xffffffffu, accumulators(a0), src % 32);
            float lo1 = __shfl_sync(0xffffffffu, accumulators(a1), src % 32);
            float lo2 = __shfl_sync(0xffffffffu, accumulators(a0), (src + 1) % 32);
            float lo3 = __shfl_sync(0xffffffffu, accumulators(a1), (src + 1) % 32);
            float hi0 = __shfl_sync(0xffffffffu, accumulators(b0), src % 32);
            float hi1 = __shfl_sync(0xffffffffu, accumulators(b1), src % 32);
            float hi2 = __shfl_sync(0xffffffffu, accumulators(b0), (src + 1) % 32);
            float hi3 = __shfl_sync(0xffffffffu, accumulators(b1), (src + 1) % 32);
            bool upper = q >= 2;
            int n = get<1>(tCcD(a0)) + 2 * q;  // the quad's first column + 4q
            if (row_ok && n < N)
              red_add4(dst + n, w * (upper ? hi0 : lo0), w * (upper ? hi1 : lo1),
                       w * (upper ? hi2 : lo2), w * (upper ? hi3 : lo3));
          }
#else
          CUTLASS_PRAGMA_UNROLL
          for (int v = 0; v < size<0, 2>(tCcD); ++v) {
            auto at = make_coord(make_coord(0, h, v), mm, nn);
            auto next = make_coord(make_coord(1, h, v), mm, nn);
            int n = get<1>(tCcD(at));
            if (row_ok && n < N) red_add2(dst + n, w * accumulators(at), w * accumulators(next));
          }
#endif
        }
      }
    }
  }

 private:
  // No memory clobber: nothing in the epilogue reads what these add to.
  CUTLASS_DEVICE static void red_add2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b));
  }

  CUTLASS_DEVICE static void red_add4(float* p, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b),
                 "f"(c), "f"(d));
  }

  Params params;
};

template <class ElementD, class StrideD>
using ScatterAddCollective = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    ScatterAddEpilogue<ElementD, StrideD>>;

}  // namespace probe

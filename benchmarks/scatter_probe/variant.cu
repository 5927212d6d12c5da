// One down-GEMM variant of the probe (build.sh compiles it once per -D set): EPI 0 is the shipped
// kernel (bf16 rows through CUTLASS's TMA epilogue), 3 the scatter-add epilogue (scatter_add.cuh,
// SCATTER_VEC 2 or 4 floats per red) with the mainloop rebuilt for its empty shared storage.
#include "scatter_add.cuh"
#include "sm90_grouped_gemm.cuh"

using Plain = autotune::sm90::Sm90Kernel<cutlass::bfloat16_t, TM, TN, TK, CM, CN, COOP, false,
                                         autotune::kIdentity>;
struct Scattered : Plain {
  using CollectiveEpilogue =
      probe::ScatterAddCollective<cutlass::bfloat16_t,
                                  cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor*>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      std::conditional_t<COOP, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>>::CollectiveOp;
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};
template <int Epi>
int run(int g, const int32_t* mnk, const void* const* a, const void* const* b, void* const* d,
        void* ws, size_t wsb, int sm, cudaStream_t s, const void* d_base,
        const int32_t* pair_of_row, const float* pair_weight, float* out, int top_k,
        long ld_out) {
  using namespace autotune;
  using G = sm90::PtrArrayGemm<std::conditional_t<Epi == 3, Scattered, Plain>>;
  if constexpr (Epi != 3) {
    return G::run(g, mnk, a, b, d, ws, wsb, sm, 0, 1, s);
  } else {  // G::launch with the scatter inputs set in the epilogue's arguments
    auto l = G::layout(g, G::cutlass_workspace(g, sm));
    if (wsb < l.total) return fail(kWorkspaceTooSmall, "workspace");
    auto* w = static_cast<uint8_t*>(ws);
    fill_group_arguments<<<(g + 127) / 128, 128, 0, s>>>(g, mnk, a, b, d, G::group_args(w, l));
    int dev = 0;
    cudaGetDevice(&dev);
    cutlass::KernelHardwareInfo hw{dev, sm, G::max_active_clusters()};
    auto args = G::arguments(g, w, l, hw, Schedule{0, 1});
    args.epilogue.thread.scatter = {d_base, pair_of_row, pair_weight, out, top_k, ld_out};
    typename G::Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess)
      return fail(kCannotImplement, "can_implement");
    if (gemm.initialize(args, w + l.cutlass, s) != cutlass::Status::kSuccess)
      return fail(kInitializeFailed, "initialize");
    if (gemm.run(s) != cutlass::Status::kSuccess) return fail(kLaunchFailed, "run");
    return kOk;
  }
}

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
extern "C" int CAT(NAME, _run)(int g, const int32_t* mnk, const void* const* a,
                              const void* const* b, void* const* d, void* ws, size_t wsb, int sm,
                              cudaStream_t s, const void* d_base, const int32_t* pair_of_row,
                              const float* pair_weight, float* out, int top_k, long ld_out) {
  return run<EPI>(g, mnk, a, b, d, ws, wsb, sm, s, d_base, pair_of_row, pair_weight, out, top_k,
                  ld_out);
}
extern "C" const char* CAT(NAME, _err)() { return autotune::g_last_error; }

// One up-GEMM variant of the probe (build.sh compiles it once per -D set): KIND 0 reads A from
// the sorted copy (the shipped kernel), 1 gathers it with cp.async, 2 with one TMA box per row.
#include "sm90_grouped_gemm.cuh"
#include "gather_cp_async.cuh"
#include "gather_tma_rows.cuh"

using Plain = autotune::sm90::Sm90Kernel<cutlass::bfloat16_t, TM, TN, TK, CM, CN, COOP, false,
                                         autotune::kRelu2>;
template <class Collective>
struct Gathered : Plain {
  using CollectiveMainloop = Collective;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<typename Plain::ProblemShape,
                                                          CollectiveMainloop,
                                                          typename Plain::CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};
using Kernel = std::conditional_t<
    KIND == 0, Plain,
    std::conditional_t<KIND == 1,
                       Gathered<probe_cp::GatherACollective<typename Plain::CollectiveMainloop>>,
                       Gathered<probe_tma::GatherACollective<typename Plain::CollectiveMainloop>>>>;
using G = autotune::sm90::PtrArrayGemm<Kernel>;

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
extern "C" int CAT(NAME, _run)(int g, const int32_t* mnk, const void* const* a,
                              const void* const* b, void* const* d, void* ws, size_t wsb, int sm,
                              int raster, int swz, cudaStream_t s, const void* base, long rows,
                              long ld) {
  probe_tma::g_source = {base, rows, ld};
  return G::run(g, mnk, a, b, d, ws, wsb, sm, raster, swz, s);
}
extern "C" const char* CAT(NAME, _err)() { return autotune::g_last_error; }

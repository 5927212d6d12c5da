// sm100a ptr-array grouped GEMM: D_g = A_g @ B_g^T for every group g, all row-major.
//
// Blackwell's counterpart of sm90_grouped_gemm.cuh, with the same C ABI, per-group arguments and
// epilogues (shared from there). The MMA is tcgen05 (UMMA): its accumulator lives in tensor
// memory, and with the 2SM schedules a pair of CTAs along cluster M issues one MMA of twice the
// rows, each CTA loading half of A's and half of B's tile. TileShape is therefore the MMA tile,
// which with 2SM spans the CTA pair.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "sm90_grouped_gemm.cuh"

namespace autotune::sm100 {

// The CUTLASS 3.x epilogue fusions and the per-group argument writer do not depend on the MMA.
using sm90::EpilogueOf;
using sm90::GroupArgs;

template <class Element_, int TileM, int TileN, int TileK, int ClusterM, int ClusterN, bool TwoSm,
          bool SwapAB, int Epilogue>
struct GroupedGemm
    : GroupedGemmEntry<GroupedGemm<Element_, TileM, TileN, TileK, ClusterM, ClusterN, TwoSm,
                                   SwapAB, Epilogue>> {
  // A 2SM MMA's CTA pair are neighbours along cluster M.
  static_assert(!TwoSm || ClusterM % 2 == 0, "2SM MMA needs an even cluster M");

  using Element = Element_;
  using ElementD = typename EpilogueOf<Epilogue, Element>::ElementD;
  static constexpr bool kSwapAB = SwapAB;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // B_g stored [N, K] row-major is K x N column-major
  using LayoutD = std::conditional_t<SwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  // A static cluster shape: the TMA multicast choice is made at compile time, and no runtime
  // (preferred / fallback) cluster shapes are needed at launch.
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using KernelSchedule =
      std::conditional_t<TwoSm, cutlass::gemm::KernelPtrArrayTmaWarpSpecialized2SmSm100,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100>;
  using EpilogueSchedule =
      std::conditional_t<TwoSm, cutlass::epilogue::PtrArrayTmaWarpSpecialized2Sm,
                         cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignmentD,  // no C operand
      ElementD, LayoutD*, kAlignmentD, EpilogueSchedule,
      typename EpilogueOf<Epilogue, Element>::Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  // autotune.space admits a tile only when two stages fit beside the epilogue: with one, TMA
  // loads and MMAs would take turns instead of overlapping.
  static_assert(CollectiveMainloop::DispatchPolicy::Stages >= 2, "fewer than 2 mainloop stages");

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideC = typename GemmKernel::InternalStrideC;
  using StrideD = typename GemmKernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // Per-group argument arrays carved from the front of the caller's workspace.
  struct Layout {
    size_t shapes, stride_a, stride_b, stride_d, ptr_a, ptr_b, ptr_d, cutlass, total;
  };

  static Layout layout(int groups, size_t cutlass_bytes) {
    Layout l{};
    size_t at = 0;
    auto take = [&](size_t bytes) { size_t here = at; at = align_up(at + bytes, 128); return here; };
    l.shapes = take(sizeof(Shape3) * groups);
    l.stride_a = take(sizeof(StrideA) * groups);
    l.stride_b = take(sizeof(StrideB) * groups);
    l.stride_d = take(sizeof(StrideD) * groups);
    l.ptr_a = take(sizeof(void*) * groups);
    l.ptr_b = take(sizeof(void*) * groups);
    l.ptr_d = take(sizeof(void*) * groups);
    l.cutlass = take(cutlass_bytes);
    l.total = at;
    return l;
  }

  static GroupArgs<GroupedGemm> group_args(uint8_t* ws, const Layout& l) {
    return {reinterpret_cast<Shape3*>(ws + l.shapes), reinterpret_cast<StrideA*>(ws + l.stride_a),
            reinterpret_cast<StrideB*>(ws + l.stride_b), reinterpret_cast<StrideD*>(ws + l.stride_d),
            reinterpret_cast<const Element**>(ws + l.ptr_a),
            reinterpret_cast<const Element**>(ws + l.ptr_b),
            reinterpret_cast<ElementD**>(ws + l.ptr_d)};
  }

  static typename Gemm::Arguments arguments(int groups, uint8_t* ws, const Layout& l,
                                            cutlass::KernelHardwareInfo hw, Schedule sched) {
    typename Gemm::Arguments args;
    decltype(args.epilogue.thread) fusion{};
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    args = typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, reinterpret_cast<Shape3*>(ws + l.shapes), nullptr},
        {reinterpret_cast<const Element**>(ws + l.ptr_a), reinterpret_cast<StrideA*>(ws + l.stride_a),
         reinterpret_cast<const Element**>(ws + l.ptr_b), reinterpret_cast<StrideB*>(ws + l.stride_b)},
        {fusion, nullptr, reinterpret_cast<StrideC*>(ws + l.stride_d),
         reinterpret_cast<ElementD**>(ws + l.ptr_d),
         reinterpret_cast<StrideD*>(ws + l.stride_d)},
        hw};
    // The sm100 group scheduler reuses sm90's: it walks each group's tiles in bands of
    // `swizzle` tiles along the raster direction, so the same order reuses L2 the same way.
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order = sched.raster ? Raster::AlongN : Raster::AlongM;
    args.scheduler.max_swizzle_size = sched.swizzle;
    return args;
  }

  static size_t cutlass_workspace(int groups, int sm_count) {
    cutlass::KernelHardwareInfo hw{0, sm_count, 0};
    Layout probe = layout(groups, 0);
    auto args = arguments(groups, nullptr, probe, hw, Schedule{0, 1});
    return Gemm::get_workspace_size(args);
  }

  static size_t workspace_size(int groups, int sm_count) {
    if (groups <= 0 || sm_count <= 0) return 0;
    return layout(groups, cutlass_workspace(groups, sm_count)).total;
  }

  static int max_active_clusters() {
    // An occupancy query: pure host work, but not free, so done once per process and device.
    static int cached[64] = {0};
    int device = 0;
    cudaGetDevice(&device);
    if (device < 0 || device >= 64) return 0;
    if (cached[device] == 0) {
      cached[device] =
          cutlass::KernelHardwareInfo::query_device_max_active_clusters<GemmKernel>();
    }
    return cached[device];
  }

  // Checks the workspace, then fills the per-group arguments with `fill(group_args)` on the
  // stream and launches the GEMM behind it: no host synchronisation anywhere.
  template <class Fill>
  static int launch(int groups, void* workspace, size_t workspace_bytes, int sm_count,
                    Schedule sched, cudaStream_t stream, Fill fill) {
    if (sm_count <= 0) return fail(kBadArgument, "sm_count must be > 0");
    Layout l = layout(groups, cutlass_workspace(groups, sm_count));
    if (workspace == nullptr || workspace_bytes < l.total)
      return fail(kWorkspaceTooSmall, "workspace smaller than workspace_size()");
    auto* ws = static_cast<uint8_t*>(workspace);
    fill(group_args(ws, l));
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
      return fail(kLaunchFailed, "setup kernel launch", cudaGetErrorString(e));
    int device = 0;
    cudaGetDevice(&device);
    cutlass::KernelHardwareInfo hw{device, sm_count, max_active_clusters()};
    auto args = arguments(groups, ws, l, hw, sched);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess)
      return fail(kCannotImplement, "CUTLASS can_implement rejected the arguments");
    if (gemm.initialize(args, ws + l.cutlass, stream) != cutlass::Status::kSuccess)
      return fail(kInitializeFailed, "CUTLASS initialize failed");
    cutlass::Status s = gemm.run(stream);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || s != cutlass::Status::kSuccess)
      return fail(kLaunchFailed, "grouped GEMM launch", cudaGetErrorString(e));
    return kOk;
  }
};

}  // namespace autotune::sm100

// sm90a ptr-array grouped GEMM: D_g = A_g @ B_g^T for every group g, all row-major.
//
// The generated translation units (sm90_grouped_gemm.cu.j2) instantiate GroupedGemm<...> once
// and export it through plain extern "C" functions. Everything the kernel needs per group (problem
// shapes, strides, operand pointers) lives in device memory and is written by a setup kernel on
// the caller's stream, so a call never synchronises with the host and captures in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "epilogues.cuh"
#include "grouped_gemm_common.cuh"
#include "sm90_weights_first_out.cuh"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace autotune::sm90 {

template <int Kind, class Element>
struct EpilogueOf {  // D = acc, stored in Element
  using ElementD = Element;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>;
};

template <class Element>
struct EpilogueOf<kRelu2, Element> {  // D = relu(acc)^2, stored in Element
  using ElementD = Element;
  using Fusion = cutlass::epilogue::fusion::LinCombEltAct<Relu2, Element, float, void, float>;
};

template <class Element>
struct EpilogueOf<kFloat32Out, Element> {  // D = acc, stored in fp32 (router logits)
  using ElementD = float;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<float, float, void, float>;
};

// Per-group arguments in the kernel's own terms, written on the device into the workspace.
template <class G>
struct GroupArgs {
  typename G::Shape3* shapes;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  const typename G::Element** a;
  const typename G::Element** b;
  typename G::ElementD** d;

  __device__ void set(int g, int m, int n, int k, const void* pa, const void* pb, void* pd) {
    using Element = typename G::Element;
    // Swap-AB runs D^T = B A^T: the weights become the wide M side and the few tokens of an
    // expert land on N, where wgmma accepts extents down to 8.
    int km = G::kSwapAB ? n : m, kn = G::kSwapAB ? m : n;
    shapes[g] = {km, kn, k};
    stride_a[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {km, k, 1});
    stride_b[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {kn, k, 1});
    stride_d[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {km, kn, 1});
    a[g] = static_cast<const Element*>(G::kSwapAB ? pb : pa);
    b[g] = static_cast<const Element*>(G::kSwapAB ? pa : pb);
    d[g] = static_cast<typename G::ElementD*>(pd);
  }
};

// The host side of a CUTLASS 3.x ptr-array grouped GEMM, whatever issues the MMA (sm90 wgmma
// here, sm100 tcgen05 in sm100_grouped_gemm.cuh): per-group argument arrays carved from the
// caller's workspace, the CUTLASS arguments with the tile order, the workspace query and the
// launch. Kernel supplies Element, ElementD, kSwapAB, ProblemShape, GemmKernel and Gemm.
template <class Kernel>
struct PtrArrayGemm : Kernel, GroupedGemmEntry<PtrArrayGemm<Kernel>> {
  using typename Kernel::Element;
  using typename Kernel::ElementD;
  using typename Kernel::ProblemShape;
  using typename Kernel::GemmKernel;
  using typename Kernel::Gemm;
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

  static GroupArgs<PtrArrayGemm> group_args(uint8_t* ws, const Layout& l) {
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
    // The group scheduler walks each group's tiles in bands of `swizzle` tiles along the
    // raster direction; which order reuses L2 best depends on the groups' shapes.
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

// The CUTLASS 3.x types of one ptr-array variant. ArchTag and the two schedules pick the MMA
// (sm90 wgmma cooperative / ping-pong here, sm100 tcgen05 1SM / 2SM in sm100_grouped_gemm.cuh);
// the GEMM, its layouts and epilogues are the same on both.
template <class ArchTag, class KernelSchedule, class EpilogueSchedule, class Element_, int TileM,
          int TileN, int TileK, int ClusterM, int ClusterN, bool SwapAB, int Epilogue>
struct PtrArrayKernel {
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

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignmentD,  // no C operand
      ElementD, LayoutD*, kAlignmentD, EpilogueSchedule,
      typename EpilogueOf<Epilogue, Element>::Fusion>::CollectiveOp;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  // sm90 swap-AB: the weights' loads marked evict-first (sm90_weights_first_out.cuh).
  using CollectiveMainloop =
      std::conditional_t<SwapAB && std::is_same_v<ArchTag, cutlass::arch::Sm90>,
                         WeightsFirstOutCollective<BuiltMainloop>, BuiltMainloop>;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <class Element, int TileM, int TileN, int TileK, int ClusterM, int ClusterN,
          bool Cooperative, bool SwapAB, int Epilogue>
using Sm90Kernel = PtrArrayKernel<
    cutlass::arch::Sm90,
    std::conditional_t<Cooperative, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                       cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>,
    std::conditional_t<Cooperative, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                       cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>,
    Element, TileM, TileN, TileK, ClusterM, ClusterN, SwapAB, Epilogue>;

template <class Element, int TileM, int TileN, int TileK, int ClusterM, int ClusterN,
          bool Cooperative, bool SwapAB, int Epilogue>
using GroupedGemm = PtrArrayGemm<Sm90Kernel<Element, TileM, TileN, TileK, ClusterM, ClusterN,
                                            Cooperative, SwapAB, Epilogue>>;

}  // namespace autotune::sm90

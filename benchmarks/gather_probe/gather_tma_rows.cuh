// Probe (benchmarks/gather_probe): A gathered row by row with one TMA box per row and 64-element
// k-slice. group g's ptr_A[g] points at its M_g row indices into one source matrix [rows, ld].
// The 128-byte swizzle is a function of the shared-memory address, so a row landed at its place in
// the stage gets the swizzle the whole-tile box would have given it (the outputs match the sorted-
// copy GEMM bit for bit). The mainloop warp's 32 lanes issue the rows, lane 0 also B's box; all
// complete on the stage's barrier with the whole tile's bytes (rows past M load row 0 again).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "b_follows_group.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"

namespace probe_tma {
using namespace autotune::sm90;

// The rows A is gathered from: `rows` rows of `ld` elements (16-byte aligned) at `base`; set by
// the probe before each launch (the product's argument path has no field for it).
struct GatherSource {
  const void* base = nullptr;
  int64_t rows = 0;
  int64_t ld = 0;
};
inline GatherSource g_source;

// Base: the CollectiveMma the CUTLASS builder made for the same tile, cluster and schedule
// (MainloopSm90ArrayTmaGmmaWarpSpecialized, A K-major).
template <class Base>
struct GatherACollective : probe_common::OnlyBFollowsGroup<Base, int32_t> {
  using typename Base::ElementA;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TensorMapStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  using typename Base::DispatchPolicy;
  using Base::IsGroupedGemmKernel;

  static_assert(cute::is_same_v<cute::remove_pointer_t<typename Base::StrideA>,
                                cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>>,
                "the gathered A must be K-major (row-major M x K)");
  static_assert(sizeof(ElementA) == 2, "16-bit A: a 128-byte swizzle row is 64 elements");

  static constexpr int kTileM = cute::size<0>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  static constexpr int kSliceK = 64;  // elements of one 128-byte swizzle row
  static constexpr int kSlices = kTileK / kSliceK;
  static constexpr int kRowRegisters = kTileM / 32;  // lane l issues rows l + 32q
  static_assert(kTileK % kSliceK == 0 && kTileM % 32 == 0, "tile must split into 32-row groups");

  struct Params : Base::Params {
    cute::TmaDescriptor rows_desc;  // the source, boxes of one row by kSliceK elements
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape shapes,
                                        typename Base::Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(shapes, args, workspace);
    p.rows_desc = {};
    GatherSource const& s = g_source;
    if (s.base == nullptr) return p;  // a size query, never launched
    cuuint64_t dims[2] = {cuuint64_t(s.ld), cuuint64_t(s.rows)};
    cuuint64_t strides[1] = {cuuint64_t(s.ld) * sizeof(ElementA)};
    cuuint32_t box[2] = {kSliceK, 1};
    cuuint32_t steps[2] = {1, 1};
    constexpr auto type = cute::is_same_v<ElementA, cutlass::bfloat16_t>
                              ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                              : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    CUresult r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        &p.rows_desc, type, 2, const_cast<void*>(s.base), dims, strides, box, steps,
        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) p.rows_desc = {};
    return p;
  }

  // The mainloop warp, all 32 lanes: per k-tile, B's box from lane 0 and A's rows from every lane.
  template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState write, LoadInputs const& inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile, int k_tiles,
                           int, uint32_t block_rank_in_cluster, TensorStorage& smem) {
    using namespace cute;
    int lane = int(threadIdx.x % 32);
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    auto [tBgB, tBsB, mcast_b] = this->b_load(params, inputs, blk_coord, block_rank_in_cluster,
                                              smem);
    int32_t const* rows = get<2>(inputs);
    int m0 = int(get<0>(blk_coord)) * kTileM;
    int valid = min(kTileM, int(get<3>(inputs)) - m0);
    int32_t row[kRowRegisters];
    CUTLASS_PRAGMA_UNROLL
    for (int q = 0; q < kRowRegisters; ++q) {
      int r = lane + 32 * q;
      row[q] = rows[m0 + (r < valid ? r : 0)];
    }
    uint64_t desc = reinterpret_cast<uint64_t>(&params.rows_desc);
    for (; k_tiles > 0; --k_tiles) {
      pipeline.producer_acquire(write);  // lane 0, the pipeline's leader, sets the expected bytes
      __syncwarp();
      auto* barrier = pipeline.producer_get_barrier(write);
      int stage = write.index();
      if (lane == 0)
        copy(params.tma_load_b.with(get<1>(tensormaps), *barrier, mcast_b),
             tBgB(_, _, _, *k_tile), tBsB(_, _, _, stage));
      uint32_t bar = cast_smem_ptr_to_uint(barrier);
      int k0 = int(*k_tile) * kTileK;
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < kRowRegisters; ++q) {
        CUTLASS_PRAGMA_UNROLL
        for (int s = 0; s < kSlices; ++s) {
          // The row's 128-byte line in the stage (the swizzle only permutes its 16-byte chunks).
          uint32_t dst = cast_smem_ptr_to_uint(&sA(lane + 32 * q, s * kSliceK, stage)) & ~127u;
          asm volatile(
              "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst), "l"(desc), "r"(bar),
              "r"(k0 + s * kSliceK), "r"(row[q])
              : "memory");
        }
      }
      ++k_tile;
      ++write;
    }
  }
};

}  // namespace probe_tma

// Probe (benchmarks/gather_probe): A gathered row by row with cp.async. Group g's ptr_A[g] points
// at its M_g row pointers (each row K contiguous elements). One producer warp (CUTLASS's
// auxiliary load warp, the one its blockwise-scaled FP8 mainloop uses for its scales) copies A,
// 16 bytes a lane, into the same swizzled stage buffers the TMA would have filled; its 32 lanes
// arrive on the stage's barrier when their copies land (33 producer arrivals: the mainloop warp's
// TMA leader for B, the weights, and these 32). The math warps are CUTLASS's, unchanged.
#pragma once

#include <cstdint>

#include "b_follows_group.cuh"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

namespace probe_cp {
// CUTLASS's ptr-array TMA policy, marked as needing the auxiliary load warp.
template <class Policy>
struct AuxLoadPolicy : Policy {};
}  // namespace probe_cp

namespace cutlass::gemm::kernel::detail {
template <class Policy>
struct HasAuxiliaryLoad<probe_cp::AuxLoadPolicy<Policy>> : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

namespace probe_cp {

template <class Base>
struct GatherACollective : probe_common::OnlyBFollowsGroup<Base, typename Base::ElementA const*> {
  using DispatchPolicy = AuxLoadPolicy<typename Base::DispatchPolicy>;
  using typename Base::ElementA;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::Params;
  using typename Base::TensorStorage;
  using typename Base::TensorMapStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  using Base::IsGroupedGemmKernel;

  static constexpr int kTileM = cute::size<0>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  static constexpr int kChunkElems = 16 / sizeof(ElementA);
  static constexpr int kChunksPerRow = kTileK / kChunkElems;
  static constexpr int kRowsPerPass = 32 / kChunksPerRow;
  static constexpr int kPasses = kTileM / kRowsPerPass;
  static constexpr int kPassesPerRegister = 32 / kRowsPerPass;
  static constexpr int kRowRegisters = kTileM / 32;

  static constexpr int NumProducerThreadEvents = 1 + 32;
  static constexpr uint32_t TmaTransactionBytes = cutlass::bits_to_bytes(
      cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) *
      static_cast<uint32_t>(cute::sizeof_bits<typename Base::ElementB>::value));

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape shapes,
                                        typename Base::Arguments const& args, void* workspace) {
    Params p = Base::to_underlying_arguments(shapes, args, workspace);
    p.tma_transaction_bytes = TmaTransactionBytes;  // the TMA brings B only
    return p;
  }

  // The mainloop warp: B through the TMA from one elected lane.
  template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState write, LoadInputs const& inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile, int k_tiles,
                           int, uint32_t block_rank_in_cluster, TensorStorage& smem) {
    using namespace cute;
    if (!elect_one_sync()) return;
    auto [tBgB, tBsB, mcast_b] = this->b_load(params, inputs, blk_coord, block_rank_in_cluster,
                                              smem);
    for (; k_tiles > 0; --k_tiles) {
      pipeline.producer_acquire(write);
      auto* barrier = pipeline.producer_get_barrier(write);
      copy(params.tma_load_b.with(get<1>(tensormaps), *barrier, mcast_b), tBgB(_, _, _, *k_tile),
           tBsB(_, _, _, write.index()));
      ++k_tile;
      ++write;
    }
  }

  // The auxiliary warp: lane l copies 16-byte chunk l % kChunksPerRow of rows
  // l / kChunksPerRow + kRowsPerPass * p (each pass reads whole 128-byte lines).
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const&, MainloopPipeline pipeline,
                                     PipelineState write, LoadInputs const& inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile,
                                     int k_tiles, int lane, uint32_t, TensorStorage& smem) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    ElementA const* const* rows = get<2>(inputs);
    int m0 = int(get<0>(blk_coord)) * kTileM;
    int valid = min(kTileM, int(get<3>(inputs)) - m0);
    ElementA const* row[kRowRegisters];
    CUTLASS_PRAGMA_UNROLL
    for (int q = 0; q < kRowRegisters; ++q) {
      int r = lane + 32 * q;
      row[q] = r < valid ? rows[m0 + r] : nullptr;
    }
    int chunk = lane % kChunksPerRow, first = lane / kChunksPerRow;
    for (; k_tiles > 0; --k_tiles) {
      pipeline.producer_acquire(write);
      int stage = write.index();
      int k0 = int(*k_tile) * kTileK + chunk * kChunkElems;
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < kPasses; ++p) {
        int r = first + kRowsPerPass * p;
        auto src_row = reinterpret_cast<uintptr_t>(row[p / kPassesPerRegister]);
        src_row = __shfl_sync(0xffffffffu, src_row, r % 32);
        if (r < valid) {
          uint32_t dst = cast_smem_ptr_to_uint(&sA(r, chunk * kChunkElems, stage));
          auto src = reinterpret_cast<ElementA const*>(src_row) + k0;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
        }
      }
      pipeline.producer_commit(write, cutlass::arch::cpasync_barrier_arrive_noinc);
      ++k_tile;
      ++write;
    }
  }
};

}  // namespace probe_cp

// CUTLASS's sm90 ptr-array TMA mainloop for swap-AB kernels, with one change: the loads of A,
// the weights there, carry the L2 evict-first hint. A swap-AB kernel holds an expert's few
// tokens in one N tile, so each weight byte it streams is used once in the forward; marked
// evict-first, those lines are the first the L2 replaces, ahead of the tokens' rows that every
// weight tile of the expert re-reads and of the outputs the next kernel reads back.
// Measured (benchmarks/NOTES.md, v16): Super T=8 and T=32 forwards 3.3-3.4% faster, Ultra
// 0.6-2.9% (T = 8..1024).
// The kernels that carry the weights as B (many tokens per expert) measured slower with the
// same hint on B (Super T=2048 +1%, T=8192 +10%) and keep CUTLASS's mainloop. Where a swap-AB
// kernel's experts overflow its N tile (a weight tile then read twice), the tuner, which times
// these kernels as they are, decides whether it still wins.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"

namespace autotune::sm90 {

// Base: the CollectiveMma the CUTLASS builder made (MainloopSm90ArrayTmaGmmaWarpSpecialized).
template <class Base>
struct WeightsFirstOutCollective : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::Params;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::DispatchPolicy;

  // Base::load with A's loads hinted evict-first; everything else as CUTLASS has it.
  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState write,
                           cute::tuple<TensorA, TensorB> const& inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile, int k_tiles, int,
                           uint32_t block_rank_in_cluster, TensorStorage& smem) {
    using namespace cute;
    if (!elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(smem.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(typename DispatchPolicy::ClusterShape());
    uint32_t block_m = block_rank_in_cluster % cluster_x;
    uint32_t block_n = block_rank_in_cluster / cluster_x;
    auto block_tma_a = params.tma_load_a.get_slice(block_n);
    auto block_tma_b = params.tma_load_b.get_slice(block_m);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(get<0>(inputs)(_, _, m_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(get<1>(inputs)(_, _, n_coord, _, l_coord));
    Tensor tBsB = block_tma_b.partition_D(sB);
    uint16_t mcast_a = 0, mcast_b = 0;
    auto blocks = Layout<typename DispatchPolicy::ClusterShape>{};  // (m, n) -> block id
    if constexpr (is_same_v<typename Base::GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      for (int n = 0; n < size<1>(blocks); ++n) mcast_a |= uint16_t(1) << blocks(block_m, n, 0);
    }
    if constexpr (is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      for (int m = 0; m < size<0>(blocks); ++m) mcast_b |= uint16_t(1) << blocks(m, block_n, 0);
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tiles > 0; --k_tiles) {
      pipeline.producer_acquire(write);
      auto* barrier = pipeline.producer_get_barrier(write);
      int stage = write.index();
      copy(params.tma_load_a.with(get<0>(tensormaps), *barrier, mcast_a,
                                  TMA::CacheHintSm90::EVICT_FIRST),
           tAgA(_, _, _, *k_tile), tAsA(_, _, _, stage));
      copy(params.tma_load_b.with(get<1>(tensormaps), *barrier, mcast_b),
           tBgB(_, _, _, *k_tile), tBsB(_, _, _, stage));
      ++k_tile;
      ++write;
    }
  }
};

}  // namespace autotune::sm90

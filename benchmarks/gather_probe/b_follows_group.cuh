// What both gathering probes do with B (the weights) as CUTLASS's mainloop does: only B's
// descriptor follows the group (A never goes through CUTLASS's A descriptor), and B's TMA
// partitions and multicast mask for a tile. A's rows come from the group's ptr_A, read as an
// array of ARow (a row pointer or a row index, per probe).
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"

namespace probe_common {

template <class Base, class ARow>
struct OnlyBFollowsGroup : Base {
  // (gA_mkl, gB_nkl, the group's A rows, the group's M): the kernel reads the tile counts off
  // the first two; tensors_perform_update sets the last two whenever the group changes.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& shape,
                                typename Base::Params const& params) const {
    auto base = Base::load_init(shape, params);
    return cute::make_tuple(cute::get<0>(base), cute::get<1>(base),
                            static_cast<ARow const*>(nullptr), int32_t(0));
  }

  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& in,
                                                     typename Base::Params const& params,
                                                     ProblemShape_MNKL shape, int32_t group) {
    return cute::make_tuple(cute::get<0>(in), cute::get<1>(in),
                            reinterpret_cast<ARow const*>(params.ptr_A[group]),
                            int32_t(cute::get<0>(shape)));
  }

  template <class TensorMapA, class TensorMapB, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(
      typename Base::TensorMapStorage& smem, typename Base::Params const& params,
      cute::tuple<TensorMapA, TensorMapB> const&, ProblemShape_MNKL shape, int32_t group) {
    if (cute::elect_one_sync()) {
      cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_B, params.ptr_B[group]);
      if constexpr (Base::IsGroupedGemmKernel) {
        cute::array<uint32_t, 5> dims = {1, 1, 1, 1, 1};
        cute::array<uint64_t, 5> strides = {0, 0, 0, 0, 0};
        typename Base::InternalElementB const* none = nullptr;
        auto b = cute::make_tensor(
            none, cute::make_shape(cute::get<1>(shape), cute::get<2>(shape), cute::Int<1>{}),
            params.dB[group]);
        cute::detail::fill_tma_gmem_shape_stride(params.tma_load_b, b, dims, strides);
        for (uint64_t& s : strides)
          s = s * cute::sizeof_bits_v<typename Base::InternalElementB> / 8;
        cute::tma_descriptor_replace_dims_strides_in_shared_mem(smem.smem_tensormap_B, dims,
                                                                strides);
      }
    }
  }

  // (B's global tiles of this work tile, B's shared stages, the multicast mask) for the TMA.
  template <class LoadInputs, class BlockCoord>
  CUTLASS_DEVICE static auto b_load(typename Base::Params const& params,
                                    LoadInputs const& inputs, BlockCoord const& blk_coord,
                                    uint32_t block_rank_in_cluster,
                                    typename Base::TensorStorage& smem) {
    using namespace cute;
    using Cluster = typename Base::DispatchPolicy::ClusterShape;
    Tensor sB = make_tensor(make_smem_ptr(smem.smem_B.data()), typename Base::SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(Cluster{});
    auto block_tma_b = params.tma_load_b.get_slice(block_rank_in_cluster % cluster_x);
    Tensor gB = get<1>(inputs)(_, _, get<1>(blk_coord), _, get<3>(blk_coord));
    uint16_t mcast_b = 0;
    if constexpr (is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto blocks = Layout<Cluster>{};
      for (int m = 0; m < size<0>(blocks); ++m)
        mcast_b |= uint16_t(1) << blocks(m, block_rank_in_cluster / cluster_x, Int<0>{});
    }
    return make_tuple(block_tma_b.partition_S(gB), block_tma_b.partition_D(sB), mcast_b);
  }
};

}  // namespace probe_common

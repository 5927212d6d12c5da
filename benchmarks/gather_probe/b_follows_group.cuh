// Both gathering probes' tensor-map update: only B's descriptor (the weights) follows the group,
// since A never goes through CUTLASS's A descriptor.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"

namespace probe_common {

template <class Base>
struct OnlyBFollowsGroup : Base {
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
};

}  // namespace probe_common

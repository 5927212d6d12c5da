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

// The CUTLASS types of one sm100 variant: the tcgen05 schedules in sm90's ptr-array kernel
// types; GroupedGemm below adds sm90's launcher, which does not depend on the MMA either.
template <class Element, int TileM, int TileN, int TileK, int ClusterM, int ClusterN, bool TwoSm,
          bool SwapAB, int Epilogue>
struct Sm100Kernel
    : sm90::PtrArrayKernel<
          cutlass::arch::Sm100,
          std::conditional_t<TwoSm, cutlass::gemm::KernelPtrArrayTmaWarpSpecialized2SmSm100,
                             cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100>,
          std::conditional_t<TwoSm, cutlass::epilogue::PtrArrayTmaWarpSpecialized2Sm,
                             cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm>,
          Element, TileM, TileN, TileK, ClusterM, ClusterN, SwapAB, Epilogue> {
  // A 2SM MMA's CTA pair are neighbours along cluster M.
  static_assert(!TwoSm || ClusterM % 2 == 0, "2SM MMA needs an even cluster M");
  // autotune.space admits a tile only when two stages fit beside the epilogue: with one, TMA
  // loads and MMAs would take turns instead of overlapping.
  static_assert(Sm100Kernel::CollectiveMainloop::DispatchPolicy::Stages >= 2,
                "fewer than 2 mainloop stages");
};

template <class Element, int TileM, int TileN, int TileK, int ClusterM, int ClusterN, bool TwoSm,
          bool SwapAB, int Epilogue>
using GroupedGemm = sm90::PtrArrayGemm<Sm100Kernel<Element, TileM, TileN, TileK, ClusterM,
                                                   ClusterN, TwoSm, SwapAB, Epilogue>>;

}  // namespace autotune::sm100

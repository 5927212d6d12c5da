// A CUDA-core grouped GEMM for decode: D_g = epilogue(A_g @ B_g^T) where every group has only a
// few rows (a token or two per expert, or a handful of tokens through a dense projection).
//
// There the GEMM is a weight stream: each weight byte feeds at most M_g FMAs, so time is bytes /
// bandwidth. Tensor-core tiles idle most of their width on such groups, and the ptr-array TMA
// kernels add a setup launch and per-group descriptor updates. This kernel instead streams B with
// 16-byte non-caching loads from every warp of every SM, reads the shapes and pointers straight
// from the device arrays (no setup kernel, nothing synchronises) and keeps the few A rows in L1.
//
// Work item: kRowsPerWarp * kWarps consecutive rows of B (columns of D) of one group, all of the
// group's rows of A, kMaxM of them per pass (more rows make more passes: correct for any M, fast
// for M <= kMaxM). Two schedules walk the items of all non-empty groups (measured on an H200 with
// 22 or 44 of 512 experts active, benchmarks/gemv_schedules.cu, NOTES.md v7):
// - items: persistent CTAs take items round-robin, each warp loads a K step of its rows into
//   registers and then does its FMAs. Best for long rows (down projection, K = 2688: 33.5 us
//   against 36.3 at one token, 62.1 against 63.2 at two).
// - bulk: one CTA per SM streams a contiguous run of items through a ring of shared-memory
//   stages filled by the bulk-copy engine, consumer warps doing the FMAs from there. Best for
//   short rows (up projection, K = 1024: 34.2 us against 37.8 at one token, 61.7 against 68.3 at
//   two) and for several rows of A per pass (16x4: 34.2 against 43.9).
// The tuner times both per stage (8-row configs run "items", 16- and 32-row ones "bulk"); the
// dense launch (one group: the latent projections) runs "items" in both, with K split over the
// warps of a CTA where it is long (dense_split_kernel). The combine launch (combine_dense_kernel)
// is fc2 of the MoE forward with the combine of the experts' outputs before it, on the bulk
// schedule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device_facts.cuh"
#include "epilogues.cuh"
#include "grouped_gemm_common.cuh"
#include "pdl.cuh"

namespace autotune::gemv {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kVec = 8;               // elements per 16-byte load
constexpr int kWarpK = 32 * kVec;     // K elements one warp covers per load
// Item offsets of every group live in shared memory (4 bytes per group).
constexpr int kMaxGroups = 8192;

// Weights are read exactly once: keep them out of L1 (A's rows live there) and let L2 fetch
// 256-byte sectors ahead of the stream.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <class Element>
__device__ __forceinline__ void to_float(uint4 v, float (&f)[kVec]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 p;
    if constexpr (std::is_same_v<Element, __nv_bfloat16>)
      p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    else
      p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <class Out>
__device__ __forceinline__ Out from_float(float v) {
  if constexpr (std::is_same_v<Out, float>)
    return v;
  else if constexpr (std::is_same_v<Out, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return __float2half_rn(v);
}

template <class Element_, int kRowsPerWarp_, int kMaxM, int kEpilogue>
struct Gemv {
  static constexpr int kUnroll = 4;  // loads per row in one K step
  using Element = Element_;
  using ElementD = std::conditional_t<kEpilogue == kFloat32Out, float, Element>;
  static constexpr int kRowsPerWarp = kRowsPerWarp_;
  static constexpr int kRowsOfA = kMaxM;  // rows of A per pass
  // CTAs per SM the dense launch asks registers for (64, 102, 128 registers a thread): 8 keeps
  // a split fc1 (1024 items of 2 rows for the Super preset) in one wave on 132 SMs.
  static constexpr int kDenseMinBlocks = kRowsPerWarp * kMaxM <= 2   ? 8
                                         : kRowsPerWarp * kMaxM <= 4 ? 5
                                                                     : 4;
  static constexpr int kRowsPerItem = kRowsPerWarp * kWarps;
  static constexpr int kStepK = kUnroll * kWarpK;
  using Loads = uint4[kUnroll][kRowsPerWarp];
  using Acc = float[kMaxM][kRowsPerWarp];

  // Loads of one K step (columns base + u * kWarpK, those before kend) of the rows at brow.
  static __device__ __forceinline__ void load(const Element* const (&brow)[kRowsPerWarp],
                                              int kend, int base, Loads& v) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (base + u * kWarpK < kend) v[u][r] = load_stream(brow[r] + base + u * kWarpK);
  }

  // The FMAs of one K step against mc <= kMaxM rows of A (row stride k, read through L1).
  static __device__ __forceinline__ void fma(const Loads& v, const Element* arow, int k,
                                             int kend, int mc, int base, Acc& acc) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kk = base + u * kWarpK;
      if (kk >= kend) break;
      float bf[kRowsPerWarp][kVec];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) to_float<Element>(v[u][r], bf[r]);
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i < mc) {
          float af[kVec];
          to_float<Element>(__ldg(reinterpret_cast<const uint4*>(arow + i * k + kk)), af);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[i][r] = fmaf(af[e], bf[r][e], acc[i][r]);
        }
      }
    }
  }

  // Warp-reduce the rows' sums, apply the epilogue, store rows row0 + r < n; zero acc.
  static __device__ __forceinline__ void store(Acc& acc, ElementD* d, int n, int m0, int mc,
                                               int row0) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i >= mc) break;  // those accumulators stayed zero
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float sum = acc[i][r];
        acc[i][r] = 0.f;
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (threadIdx.x % 32 == 0 && row0 + r < n) put(d, n, m0 + i, row0 + r, sum);
      }
    }
  }

  static __device__ __forceinline__ void put(ElementD* d, int n, int i, int row, float sum) {
    if constexpr (kEpilogue == kRelu2) sum = Relu2<float>()(sum);
    d[static_cast<size_t>(i) * n + row] = from_float<ElementD>(sum);
  }

  static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[i][r] = 0.f;
  }

  // Rows row0 .. row0 + kRowsPerWarp of B (past n: row n - 1 again, never stored).
  static __device__ __forceinline__ void rows(const Element* b, int n, int k, int row0,
                                              const Element* (&brow)[kRowsPerWarp]) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      brow[r] = b + static_cast<size_t>(min(row0 + r, n - 1)) * k;
  }

  // One warp, the items schedule: D[0:m, row0:row0+kRowsPerWarp] of one group; a [m, k], b [n, k],
  // d [m, n] row-major. Each K step's loads, then its FMAs.
  static __device__ void item(const Element* __restrict__ a, const Element* __restrict__ b,
                              ElementD* __restrict__ d, int m, int n, int k, int row0) {
    const Element* brow[kRowsPerWarp];
    rows(b, n, k, row0, brow);
    for (int m0 = 0; m0 < m; m0 += kMaxM) {  // more rows of A re-stream the rows per pass
      const int mc = min(kMaxM, m - m0);
      const Element* arow = a + static_cast<size_t>(m0) * k;
      Acc acc;
      zero(acc);
      for (int base = threadIdx.x % 32 * kVec; base < k; base += kStepK) {
        Loads v;
        load(brow, k, base, v);
        fma(v, arow, k, k, mc, base, acc);
      }
      store(acc, d, n, m0, mc, row0);
    }
  }

  // One warp of a split item (dense launch): the warp's part [kbegin, kend) of K for the rows
  // at row0. The CTA's `split` consecutive warps share the rows and add their partial sums
  // through shared memory in part order (deterministic), the first of them storing; every warp
  // of the CTA calls it with the same m and split (the block synchronises).
  static __device__ void split_item(const Element* __restrict__ a, const Element* __restrict__ b,
                                    ElementD* __restrict__ d, int m, int n, int k, int row0,
                                    int kbegin, int kend, int split,
                                    float (*partial)[kMaxM][kRowsPerWarp]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const Element* brow[kRowsPerWarp];
    rows(b, n, k, row0, brow);
    for (int m0 = 0; m0 < m; m0 += kMaxM) {
      const int mc = min(kMaxM, m - m0);
      const Element* arow = a + static_cast<size_t>(m0) * k;
      Acc acc;
      zero(acc);
      for (int base = kbegin + lane * kVec; base < kend; base += kStepK) {
        Loads v;
        load(brow, kend, base, v);
        fma(v, arow, k, kend, mc, base, acc);
      }
#pragma unroll
      for (int i = 0; i < kMaxM; ++i)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          float sum = acc[i][r];
#pragma unroll
          for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          if (lane == 0) partial[warp][i][r] = sum;
        }
      __syncthreads();
      if (warp % split == 0 && lane == 0)
        for (int i = 0; i < mc; ++i)
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            float sum = partial[warp][i][r];
            for (int p = 1; p < split; ++p) sum += partial[warp + p][i][r];
            if (row0 + r < n) put(d, n, m0 + i, row0 + r, sum);
          }
      __syncthreads();  // partial is rewritten by the next pass
    }
  }
};

// first[g]: index of group g's first item, items_of(m, n, k) items for a group with rows (none
// without); returns the number of items. Every thread of the block takes part. All shapes are
// read before any is summed (the loads of a thread's groups are independent, so they overlap:
// the shapes were just written by the routing kernel and come from L2), then the block scans the
// counts in shared memory. (Four groups per thread per scan step cost the items kernel 8
// registers, one CTA per SM, and 3 us on the down projection.)
constexpr int kMaxBlockWarps = 32;

template <class ItemsOf>
__device__ int scan_items(int groups, const int32_t* __restrict__ mnk, int* first,
                          ItemsOf items_of) {
  __shared__ int warp_sums[kMaxBlockWarps];
  __shared__ int carry;
  const int threads = blockDim.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int g = threadIdx.x; g < groups; g += threads) {
    const int m = mnk[3 * g];
    first[g] = m > 0 ? items_of(m, mnk[3 * g + 1], mnk[3 * g + 2]) : 0;
  }
  __syncthreads();
  int running = 0;  // items of the groups before this chunk
  for (int g0 = 0; g0 < groups; g0 += threads) {
    const int g = g0 + threadIdx.x;
    const int items = g < groups ? first[g] : 0;
    int incl = items;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();  // every thread has read its group's count, too
    int before = running;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    if (g < groups) first[g] = before + incl - items;
    if (threadIdx.x == threads - 1) carry = before + incl;
    __syncthreads();
    running = carry;
    __syncthreads();  // warp_sums and carry are rewritten by the next chunk
  }
  return running;
}

// Items of kRows weight rows each.
template <int kRows>
struct ItemsOfRows {
  __device__ int operator()(int, int n, int) const { return (n + kRows - 1) / kRows; }
};

// The last group whose first item is <= it (empty groups share their successor's first item).
__device__ __forceinline__ int group_of(const int* first, int groups, int it) {
  int lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first[mid] <= it) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <class G>
__global__ void __launch_bounds__(kThreads)
grouped_items_kernel(int groups, const int32_t* __restrict__ mnk,
                     const void* const* __restrict__ ptr_a, const void* const* __restrict__ ptr_b,
                     void* const* __restrict__ ptr_d) {
  using Element = typename G::Element;
  using ElementD = typename G::ElementD;
  extern __shared__ int first[];
  pdl::enter();  // the shapes and pointers come from the routing kernel
  const int total = scan_items(groups, mnk, first, ItemsOfRows<G::kRowsPerItem>{});
  const int row = (threadIdx.x / 32) * G::kRowsPerWarp;  // the warp's rows within an item
  for (int it = blockIdx.x; it < total; it += gridDim.x) {
    const int g = group_of(first, groups, it);
    G::item(static_cast<const Element*>(ptr_a[g]), static_cast<const Element*>(ptr_b[g]),
            static_cast<ElementD*>(ptr_d[g]), mnk[3 * g], mnk[3 * g + 1], mnk[3 * g + 2],
            (it - first[g]) * G::kRowsPerItem + row);
  }
}

template <class G>
__global__ void __launch_bounds__(kThreads)
dense_kernel(int m, int n, int k, const typename G::Element* __restrict__ a,
             const typename G::Element* __restrict__ b, typename G::ElementD* __restrict__ d) {
  pdl::enter();
  const int total = (n + G::kRowsPerItem - 1) / G::kRowsPerItem;
  const int row = (threadIdx.x / 32) * G::kRowsPerWarp;
  for (int it = blockIdx.x; it < total; it += gridDim.x)
    G::item(a, b, d, m, n, k, it * G::kRowsPerItem + row);
}

// The dense launch where K has two or more steps: `split` (2 or 4) consecutive warps share an
// item's rows, each summing its part of K. In one warp a long K is several dependent round
// trips to DRAM per item; split, each warp's part is about one K step, and all of a few-token
// projection's weights can be in flight at once (fc1 of the Super preset, K = 4096: 8.7 -> 7.1
// us at one token on an H200, NOTES.md v8).
template <class G>
__global__ void __launch_bounds__(kThreads, G::kDenseMinBlocks)
dense_split_kernel(int m, int n, int k, int split, const typename G::Element* __restrict__ a,
                   const typename G::Element* __restrict__ b,
                   typename G::ElementD* __restrict__ d) {
  __shared__ float partial[kWarps][G::kRowsOfA][G::kRowsPerWarp];
  pdl::enter();
  const int warp = threadIdx.x / 32;
  const int rows_per_item = G::kRowsPerWarp * (kWarps / split);
  const int total = (n + rows_per_item - 1) / rows_per_item;
  const int steps = (k + G::kStepK - 1) / G::kStepK;
  const int per_part = (steps + split - 1) / split * G::kStepK;
  const int kbegin = warp % split * per_part, kend = min(k, kbegin + per_part);
  for (int it = blockIdx.x; it < total; it += gridDim.x)
    G::split_item(a, b, d, m, n, k, it * rows_per_item + warp / split * G::kRowsPerWarp, kbegin,
                  kend, split, partial);
}

// The bulk schedule. One CTA per SM: a producer warp whose one thread copies whole blocks of
// weight rows (contiguous bytes) into a ring of shared-memory stages with the bulk-copy engine
// (cp.async.bulk, completion counted on an mbarrier), and kBulkConsumers warps that do the FMAs
// out of shared memory and hand each stage back. The register-fed items keep at most their load
// registers in flight per SM; here kBulkStages * kBulkStageBytes are, which covers DRAM latency
// from every SM at once. Measured on an H200 (benchmarks/bulk_read.cu, NOTES.md v7): such a ring
// alone reads the one-token up projection's 121 MB at 4.3 TB/s with 8-32 KB copies, but one
// issuing thread manages a copy per ~360 cycles (4 KB copies: 2.9 TB/s), hence a whole row
// block per stage. What the FMAs add is the consumers' time: 16 warps summing row pairs, 4
// stages (0.5-0.9 us faster than 6; 16 KB stages and warp-private rings were slower).
constexpr int kBulkConsumers = 16;
constexpr int kBulkThreads = 32 * (kBulkConsumers + 1);
constexpr int kBulkStages = 4;
constexpr int kBulkStageBytes = 32 * 1024;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

// Wait for the completion of the barrier's phase of this parity. Parity only tells the current
// phase from the one before: a waiter must never be more than one phase ahead of the barrier
// (here every consumer waits on every stage in order, and the producer on each stage's release).
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Copy `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory;
// the barrier's phase completes when they have landed. Weights are read once: evict them first
// from L2, so the activations and the routing's small arrays stay.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes),
      "r"(smem_addr(bar)), "l"(policy) : "memory");
}

__device__ __forceinline__ uint4 load_shared(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_addr(p)));
  return v;
}

// kMaxRows: weight rows per block (one stage) at most; fewer where they would not fit.
// kASmem: A lives in shared memory (the combine launch), not in global memory.
template <class Element_, int kMaxRows, int kMaxM, int kEpilogue, bool kASmem = false>
struct Bulk {
  using Element = Element_;
  using ElementD = std::conditional_t<kEpilogue == kFloat32Out, float, Element>;
  static constexpr int kStageK = kBulkStageBytes / static_cast<int>(sizeof(Element));
  static constexpr int kWarpRows = 2;  // rows a consumer warp sums at once

  // Rows per block of a group whose rows have k elements. Rows longer than a stage (k > kStageK:
  // 16384 in 16-bit types, beyond any model's projections) take no stage: the consumer warps
  // stream them from global memory themselves.
  static __device__ int rows_per_block(int k) {
    return k > kStageK ? kBulkConsumers * kWarpRows : max(1, min(kMaxRows, kStageK / k));
  }

  // One consumer warp: D[:, row0 + r] = epilogue(A @ B[r]) for the rows r < rows (at most
  // kWarpRows) at b, row stride k, in shared (kShared) or global memory. The rows share each
  // load of A and give independent FMA chains.
  template <bool kShared>
  static __device__ void rows_of(const Element* __restrict__ a, const Element* b,
                                 ElementD* __restrict__ d, int m, int n, int k, int row0,
                                 int rows) {
    const int lane = threadIdx.x % 32;
    for (int m0 = 0; m0 < m; m0 += kMaxM) {  // more rows of A read the rows again
      const int mc = min(kMaxM, m - m0);
      const Element* arow = a + static_cast<size_t>(m0) * k;
      float acc[kMaxM][kWarpRows];
#pragma unroll
      for (int i = 0; i < kMaxM; ++i)
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r) acc[i][r] = 0.f;
#pragma unroll 2
      for (int c = lane * kVec; c < k; c += kWarpK) {
        float bf[kWarpRows][kVec];
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r) {
          const Element* p = b + static_cast<size_t>(min(r, rows - 1)) * k + c;
          to_float<Element>(kShared ? load_shared(p) : load_stream(p), bf[r]);
        }
#pragma unroll
        for (int i = 0; i < kMaxM; ++i) {
          if (i < mc) {
            uint4 araw;
            if constexpr (kASmem)
              araw = load_shared(arow + i * k + c);
            else
              araw = __ldg(reinterpret_cast<const uint4*>(arow + i * k + c));
            float af[kVec];
            to_float<Element>(araw, af);
#pragma unroll
            for (int r = 0; r < kWarpRows; ++r)
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[i][r] = fmaf(af[e], bf[r][e], acc[i][r]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i >= mc) break;
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r) {
          float sum = acc[i][r];
#pragma unroll
          for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          if (lane == 0 && r < rows) {
            if constexpr (kEpilogue == kRelu2) sum = Relu2<float>()(sum);
            d[static_cast<size_t>(m0 + i) * n + row0 + r] = from_float<ElementD>(sum);
          }
        }
      }
    }
  }

  // visit(g, m, n, k, row0, rows) for blocks [begin, end) of the groups, in order; group g's
  // blocks are numbered from first[g] (scan_items).
  template <class Visit>
  static __device__ void for_each(int groups, const int* first, const int32_t* mnk, int begin,
                                  int end, Visit&& visit) {
    for (int g = group_of(first, groups, begin); g < groups && first[g] < end; ++g) {
      const int lo = max(begin, first[g]) - first[g];
      const int hi = (g + 1 < groups ? min(end, first[g + 1]) : end) - first[g];
      if (lo >= hi) continue;  // an empty group
      const int m = mnk[3 * g], n = mnk[3 * g + 1], k = mnk[3 * g + 2];
      const int rows = rows_per_block(k);
      for (int blk = lo; blk < hi; ++blk)
        visit(g, m, n, k, blk * rows, min(rows, n - blk * rows));
    }
  }

  // Blocks [begin, end), one stage each, dealt in order: the producer (warp kBulkConsumers, one
  // thread) and every consumer warp walk the same sequence, so each consumer waits on every
  // stage in turn (the parity wait stays within a phase). The consumers take the run's row pairs
  // round-robin across stages (pair q: warp q % kBulkConsumers), so a warp with nothing in one
  // stage releases it at once and goes on to the next.
  static __device__ void run(int groups, const int* first, const int32_t* __restrict__ mnk,
                             const void* const* __restrict__ ptr_a,
                             const void* const* __restrict__ ptr_b,
                             void* const* __restrict__ ptr_d, int begin, int end,
                             unsigned char* stages, uint64_t* full, uint64_t* empty) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int i = 0;  // stage uses so far
    if (warp == kBulkConsumers) {
      if (lane != 0) return;
      for_each(groups, first, mnk, begin, end, [&](int g, int, int, int k, int row0, int rows) {
        if (k > kStageK) return;
        const int s = i % kBulkStages;
        bar_wait(&empty[s], ((i / kBulkStages) & 1) ^ 1);  // a fresh barrier passes parity 1
        ++i;
        bulk_load(stages + s * kBulkStageBytes,
                  static_cast<const Element*>(ptr_b[g]) + static_cast<size_t>(row0) * k,
                  static_cast<uint32_t>(rows * k * sizeof(Element)), &full[s]);
      });
      return;
    }
    int q0 = 0;  // row pairs before this block
    for_each(groups, first, mnk, begin, end, [&](int g, int m, int n, int k, int row0, int rows) {
      const auto* a = static_cast<const Element*>(ptr_a[g]);
      const auto* b = static_cast<const Element*>(ptr_b[g]);
      auto* d = static_cast<ElementD*>(ptr_d[g]);
      const int pairs = (rows + kWarpRows - 1) / kWarpRows;
      // This warp's first pair in the block, as a pair index of the run.
      const int q1 = q0 + ((warp - q0) % kBulkConsumers + kBulkConsumers) % kBulkConsumers;
      const int first_pair = q0;
      q0 += pairs;
      if (k > kStageK) {
        for (int q = q1; q < q0; q += kBulkConsumers) {
          const int r = (q - first_pair) * kWarpRows;
          rows_of<false>(a, b + static_cast<size_t>(row0 + r) * k, d, m, n, k, row0 + r,
                         min(kWarpRows, rows - r));
        }
        return;
      }
      const int s = i % kBulkStages;
      bar_wait(&full[s], (i / kBulkStages) & 1);
      ++i;
      const auto* tile = reinterpret_cast<const Element*>(stages + s * kBulkStageBytes);
      for (int q = q1; q < q0; q += kBulkConsumers) {
        const int r = (q - first_pair) * kWarpRows;
        rows_of<true>(a, tile + r * k, d, m, n, k, row0 + r, min(kWarpRows, rows - r));
      }
      __syncwarp();
      if (lane == 0) bar_arrive(&empty[s]);
    });
  }
};

template <class B>
struct BulkItems {
  __device__ int operator()(int, int n, int k) const {
    const int rows = B::rows_per_block(k);
    return (n + rows - 1) / rows;
  }
};

template <class B>
__global__ void __launch_bounds__(kBulkThreads, 1)
grouped_bulk_kernel(int groups, const int32_t* __restrict__ mnk,
                    const void* const* __restrict__ ptr_a, const void* const* __restrict__ ptr_b,
                    void* const* __restrict__ ptr_d) {
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  // full[s]: stage s has landed; empty[s]: every consumer warp is done with it.
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  int* first = reinterpret_cast<int*>(bulk_smem + kBulkStages * kBulkStageBytes);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s)
      bar_init(&full[s], 1), bar_init(&empty[s], kBulkConsumers);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  pdl::enter();  // the shapes and pointers come from the routing kernel
  const int total = scan_items(groups, mnk, first, BulkItems<B>{});  // syncs the block
  // The CTA's contiguous run [begin, end) of blocks.
  const int begin = static_cast<int>(static_cast<int64_t>(total) * blockIdx.x / gridDim.x);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (blockIdx.x + 1) / gridDim.x);
  if (begin >= end) return;
  B::run(groups, first, mnk, ptr_a, ptr_b, ptr_d, begin, end, bulk_smem, full, empty);
}

// The combine launch: fc2 with the combine before it, for a few tokens.
//   a[t] = round(sum_j w[t, j] * y[row_of[t * top_k + j]])   (fp32, a fixed order)
//   d[t] = epilogue(b @ a[t])
// Each CTA (one per SM) computes all of a into shared memory while its producer already streams
// the CTA's weight blocks (the bulk schedule), then its consumers run the dense product from
// there. As two launches (the combine kernel, then the dense gemv) this was the combine's
// launch and round trips, then the gemv's: 3.0 + 4.4 us at one token of the Super preset.
// Launched early (pdl.cuh), the producer starts that stream while the expert kernel before it
// still runs: fc2's weights depend on nothing earlier.
// The pairs of a column chunk are split over `splits` threads (pairs q, q + splits, ... in
// order, partial sums added in split order): deterministic, as the routing library's combine
// kernels are (a split sum of the same kind, not necessarily the same split).
constexpr int kCombineMaxA = 64 * 1024;     // bytes of a (tokens x K) in shared memory at most
constexpr int kCombineMaxPairs = 1024;      // tokens x top_k at most (their rows and weights)
constexpr int kCombineThreads = 32 * kBulkConsumers;
constexpr int kCombinePartial = kCombineThreads * kVec * sizeof(float);  // split partial sums
constexpr int kCombineBatch = 8;            // pairs' loads in flight per thread

// Bytes of a (m tokens of k elements), the partial sums and the pairs' rows and weights, after
// the stages: sized per launch (18 KB at one token of the Super preset, 88 KB at most), so that
// a CTA fits beside the expert kernel's last CTAs on an SM and starts its weight stream before
// they have all left.
__host__ __device__ constexpr int combine_a_bytes(int m, int k, int element_bytes) {
  return (m * k * element_bytes + 127) / 128 * 128;
}
__host__ __device__ constexpr int combine_smem(int m, int k, int top_k, int element_bytes) {
  return combine_a_bytes(m, k, element_bytes) + kCombinePartial + m * top_k * 8;
}

template <class B>
__global__ void __launch_bounds__(kBulkThreads, 1)
combine_dense_kernel(int m, int n, int k, int top_k, int splits,
                     const typename B::Element* __restrict__ y, const float* __restrict__ weights,
                     const int32_t* __restrict__ row_of, const typename B::Element* b,
                     typename B::ElementD* d) {
  using Element = typename B::Element;
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  // The one group of the dense product, as the bulk schedule reads groups.
  __shared__ int first[1];
  __shared__ int32_t mnk[3];
  __shared__ const void* ptr_a[1];
  __shared__ const void* ptr_b[1];
  __shared__ void* ptr_d[1];
  auto* a = reinterpret_cast<Element*>(bulk_smem + kBulkStages * kBulkStageBytes);
  auto* partial = reinterpret_cast<float*>(bulk_smem + kBulkStages * kBulkStageBytes +
                                           combine_a_bytes(m, k, sizeof(Element)));
  auto* pair_row = reinterpret_cast<int32_t*>(partial + kCombineThreads * kVec);
  auto* pair_w = reinterpret_cast<float*>(pair_row + m * top_k);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s)
      bar_init(&full[s], 1), bar_init(&empty[s], kBulkConsumers);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    first[0] = 0, mnk[0] = m, mnk[1] = n, mnk[2] = k;
    ptr_a[0] = a, ptr_b[0] = b, ptr_d[0] = d;
  }
  __syncthreads();
  pdl::launch_dependents();
  const int total = (n + B::rows_per_block(k) - 1) / B::rows_per_block(k);
  const int begin = static_cast<int>(static_cast<int64_t>(total) * blockIdx.x / gridDim.x);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (blockIdx.x + 1) / gridDim.x);
  if (begin < end && threadIdx.x >= kCombineThreads) {
    // The producer warp copies the CTA's weight blocks before the earlier kernels are done; the
    // stages take kBulkStages blocks at once (fc2 of the Super preset at one token: 4096 rows
    // of K = 1024 in blocks of 8 or 16 rows, 2 to 4 per SM, all of them).
    B::run(1, first, mnk, ptr_a, ptr_b, ptr_d, begin, end, bulk_smem, full, empty);
  }
  pdl::wait();  // y, the weights and the rows come from the expert kernels and the routing
  if (begin >= end || threadIdx.x >= kCombineThreads) return;
  {  // the consumers
    // Rows and weights of all pairs first (one round trip), then each thread's rows of y with
    // kCombineBatch loads in flight: two or three round trips in all, not two per pair.
    for (int p = threadIdx.x; p < m * top_k; p += kCombineThreads)
      pair_row[p] = row_of[p], pair_w[p] = weights[p];
    asm volatile("bar.sync 1, %0;" ::"r"(kCombineThreads));  // consumers only
    const int chunks = m * (k / kVec), cols = kCombineThreads / splits;
    const int q = threadIdx.x / cols;
    for (int c0 = 0; c0 < chunks; c0 += cols) {
      const int chunk = c0 + threadIdx.x % cols;
      const int t = chunk / (k / kVec), c = chunk % (k / kVec) * kVec;
      float acc[kVec] = {};
      if (chunk < chunks) {
        for (int j0 = q; j0 < top_k; j0 += splits * kCombineBatch) {
          uint4 raw[kCombineBatch];
#pragma unroll
          for (int b = 0; b < kCombineBatch; ++b) {
            const int j = j0 + b * splits;
            if (j < top_k)
              raw[b] = *reinterpret_cast<const uint4*>(
                  y + static_cast<size_t>(pair_row[t * top_k + j]) * k + c);
          }
#pragma unroll
          for (int b = 0; b < kCombineBatch; ++b) {
            const int j = j0 + b * splits;
            if (j >= top_k) break;
            const float w = pair_w[t * top_k + j];
            float v[kVec];
            to_float<Element>(raw[b], v);
#pragma unroll
            for (int i = 0; i < kVec; ++i) acc[i] += w * v[i];
          }
        }
        if (q > 0)
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            partial[((q - 1) * cols + chunk - c0) * kVec + i] = acc[i];
      }
      asm volatile("bar.sync 1, %0;" ::"r"(kCombineThreads));  // consumers only
      if (q == 0 && chunk < chunks) {
        for (int p = 1; p < splits; ++p)
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            acc[i] += partial[((p - 1) * cols + chunk - c0) * kVec + i];
        Element o[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = from_float<Element>(acc[i]);
        *reinterpret_cast<uint4*>(a + t * k + c) = *reinterpret_cast<const uint4*>(o);
      }
      asm volatile("bar.sync 1, %0;" ::"r"(kCombineThreads));  // a complete; partial reusable
    }
  }
  B::run(1, first, mnk, ptr_a, ptr_b, ptr_d, begin, end, bulk_smem, full, empty);
}

// The C ABI of every grouped-GEMM library (grouped_gemm_exports.j2). kBulk: the grouped launch's
// schedule (see the top of this file); the dense launch runs the items schedule either way.
// kPdl: the launches may start early (pdl.cuh; the library's code is for sm90 or newer).
template <class Element_, int kRowsPerWarp, int kMaxM, int kEpilogue, bool kBulk, bool kPdl>
struct GroupedGemv {
  using Items = Gemv<Element_, kRowsPerWarp, kMaxM, kEpilogue>;
  using Stream = Bulk<Element_, kRowsPerWarp * kWarps, kMaxM, kEpilogue>;
  static constexpr size_t kStageSmem = size_t(kBulkStages) * kBulkStageBytes;

  static size_t workspace_size(int, int) { return 0; }

  static int check(int sm_count, int raster, int swizzle) {
    if (sm_count <= 0) return fail(kBadArgument, "sm_count must be > 0");
    // The items have no 2-D tile grid to reorder.
    if (raster != 0 || swizzle != 1)
      return fail(kBadArgument, "gemv kernels take only raster 0 and swizzle 1");
    return kOk;
  }

  static int launched(const char* what, cudaError_t e) {  // e: pdl::launch's
    if (e != cudaSuccess) return fail(kLaunchFailed, what, cudaGetErrorString(e));
    return kOk;
  }

  static int run(int groups, const int32_t* mnk, const void* const* ptr_a,
                 const void* const* ptr_b, void* const* ptr_d, void*, size_t, int sm_count,
                 int raster, int swizzle, cudaStream_t stream) {
    if (groups <= 0 || groups > kMaxGroups || mnk == nullptr || ptr_a == nullptr ||
        ptr_b == nullptr || ptr_d == nullptr)
      return fail(kBadArgument, "groups must be in 1..8192 and the shape/pointer arrays non-null");
    if (int s = check(sm_count, raster, swizzle); s != kOk) return s;
    // Item offsets of every group (at most 32 KB), after the bulk kernel's stages.
    const size_t smem = (kBulk ? kStageSmem : 0) + sizeof(int) * groups;
    const int threads = kBulk ? kBulkThreads : kThreads;
    if constexpr (kBulk) {
      // The stages need the opt-in to more than 48 KB of shared memory, for the largest launch
      // (the most groups).
      const cudaError_t opted =
          opt_in_smem<grouped_bulk_kernel<Stream>>(int(kStageSmem + sizeof(int) * kMaxGroups));
      if (opted != cudaSuccess)
        return fail(kCannotImplement, "the bulk kernel's shared memory", cudaGetErrorString(opted));
    }
    constexpr auto kernel = [] {
      if constexpr (kBulk) return grouped_bulk_kernel<Stream>;
      else return grouped_items_kernel<Items>;
    }();
    const int per_sm = blocks_per_sm<kernel>(threads, smem);
    if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    // The items kernel starts in stream order. Launched early it made the layer slower (H200,
    // one token: Super 89.3 against 89.1 us in stream order, Ultra 275.5 against 269.1; every
    // launch in stream order: 91.6 and 271.6), the bulk kernel faster (Super 89.3 against
    // 90.2). Why is not isolated; what differs is a grid of several CTAs per SM, sized for an
    // empty GPU, placed beside the kernel before it.
    return launched("gemv launch",
                    pdl::launch<kPdl && kBulk>(kernel, per_sm * sm_count, threads, smem, stream,
                                               groups, mnk, ptr_a, ptr_b, ptr_d));
  }

  // Whether the combine launch takes m tokens of K columns and top_k pairs each.
  static bool combine_fits(int m, int k, int top_k) {
    return static_cast<int64_t>(m) * k * sizeof(Element_) <= kCombineMaxA &&
           static_cast<int64_t>(m) * top_k <= kCombineMaxPairs;
  }

  // The combine launch (combine_dense_kernel): d [m, n] = epilogue(b @ combine(y)^T) with
  // combine(y)[t] the weighted sum of y's rows row_of[t * top_k + j] (weights [m, top_k]).
  static int run_combine_dense(int m, int n, int k, int top_k, const void* y,
                               const float* weights, const int32_t* row_of, const void* b,
                               void* d, int sm_count, cudaStream_t stream) {
    using Combine = Bulk<Element_, kRowsPerWarp * kWarps, kMaxM, kEpilogue, true>;
    if (m < 0 || n <= 0 || k <= 0 || k % kVec || top_k <= 0 || y == nullptr ||
        weights == nullptr || row_of == nullptr || b == nullptr || d == nullptr)
      return fail(kBadArgument,
                  "m >= 0, n > 0, k > 0 a multiple of 8, top_k > 0, non-null pointers");
    if (sm_count <= 0) return fail(kBadArgument, "sm_count must be > 0");
    if (!combine_fits(m, k, top_k))
      return fail(kCannotImplement, "the combine launch keeps tokens x K in 64 KB of shared "
                                    "memory and up to 1024 pairs; use the combine kernel and "
                                    "run_dense beyond");
    if (m == 0) return kOk;
    // The opt-in for the largest launch that fits.
    constexpr int kMaxSmem =
        int(kStageSmem) + kCombineMaxA + kCombinePartial + kCombineMaxPairs * 8;
    const cudaError_t opted = opt_in_smem<combine_dense_kernel<Combine>>(kMaxSmem);
    if (opted != cudaSuccess)
      return fail(kCannotImplement, "the combine kernel's shared memory",
                  cudaGetErrorString(opted));
    // Threads per column chunk: about three pairs each where the chunks leave threads idle.
    const int chunks = m * (k / kVec);
    int splits = 1;
    while (splits < 8 && 2 * splits * chunks <= kCombineThreads && 3 * splits < top_k)
      splits *= 2;
    const size_t smem = kStageSmem + combine_smem(m, k, top_k, sizeof(Element_));
    return launched("gemv combine launch",
                    pdl::launch<kPdl>(combine_dense_kernel<Combine>, sm_count, kBulkThreads, smem,
                                      stream, m, n, k, top_k, splits,
                                      static_cast<const Element_*>(y), weights, row_of,
                                      static_cast<const Element_*>(b),
                                      static_cast<typename Combine::ElementD*>(d)));
  }

  static int run_dense(int m, int n, int k, const void* a, const void* b, void* d, void*,
                       size_t, int sm_count, int raster, int swizzle, cudaStream_t stream) {
    if (m < 0 || n <= 0 || k <= 0 || k % kVec || a == nullptr || b == nullptr || d == nullptr)
      return fail(kBadArgument, "m >= 0, n > 0, k > 0 a multiple of 8, non-null pointers");
    if (int s = check(sm_count, raster, swizzle); s != kOk) return s;
    if (m == 0) return kOk;
    const auto* pa = static_cast<const typename Items::Element*>(a);
    const auto* pb = static_cast<const typename Items::Element*>(b);
    auto* pd = static_cast<typename Items::ElementD*>(d);
    // Split K over 2 or 4 warps where it has that many steps.
    const int steps = (k + Items::kStepK - 1) / Items::kStepK;
    static_assert(kWarps == 4, "a split takes 2 or 4 of the CTA's warps");
    const int split = steps >= 4 ? 4 : steps >= 2 ? 2 : 1;
    const int rows_per_item = Items::kRowsPerWarp * (kWarps / split);
    const int items = (n + rows_per_item - 1) / rows_per_item;
    if (split == 1) {
      const int per_sm = blocks_per_sm<dense_kernel<Items>>(kThreads, 0);
      if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
      return launched("gemv launch",
                      pdl::launch<kPdl>(dense_kernel<Items>, min(items, per_sm * sm_count),
                                        kThreads, 0, stream, m, n, k, pa, pb, pd));
    }
    const int per_sm = blocks_per_sm<dense_split_kernel<Items>>(kThreads, 0);
    if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    return launched("gemv launch",
                    pdl::launch<kPdl>(dense_split_kernel<Items>, min(items, per_sm * sm_count),
                                      kThreads, 0, stream, m, n, k, split, pa, pb, pd));
  }
};

}  // namespace autotune::gemv

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
// group's rows of A, kMaxM of them per pass (more rows re-stream the item's weights once per
// pass: correct for any M, fast for M <= kMaxM). Two schedules walk the items of all non-empty
// groups (measured on an H200 at one token, 22 of 512 experts, benchmarks/NOTES.md v6):
// - items: persistent CTAs take items round-robin, each warp loads a K step of its rows and then
//   does its FMAs. Best for long rows (down projection, K = 2688: 33.9 us against 37.9).
// - span: each CTA takes one contiguous run of items, its warps interleaved over them, and every
//   warp issues its next step's loads before the current step's FMAs, across row boundaries.
//   Best where a row is a single step (up projection, K = 1024: 34.9 us against 38.0).
// The tuner times both per stage (8-row configs run "items", 16- and 32-row ones "span").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "epilogues.cuh"
#include "grouped_gemm_common.cuh"

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

// kUnroll: loads per row in one K step.
template <class Element_, int kRowsPerWarp_, int kMaxM, int kEpilogue, int kUnroll>
struct Gemv {
  using Element = Element_;
  using ElementD = std::conditional_t<kEpilogue == kFloat32Out, float, Element>;
  static constexpr int kRowsPerWarp = kRowsPerWarp_;
  static constexpr int kRowsPerItem = kRowsPerWarp * kWarps;
  static constexpr int kStepK = kUnroll * kWarpK;
  using Loads = uint4[kUnroll][kRowsPerWarp];
  using Acc = float[kMaxM][kRowsPerWarp];

  // Loads of one K step (columns base + u * kWarpK) of the rows at brow.
  static __device__ __forceinline__ void load(const Element* const (&brow)[kRowsPerWarp], int k,
                                              int base, Loads& v) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (base + u * kWarpK < k) v[u][r] = load_stream(brow[r] + base + u * kWarpK);
  }

  // The FMAs of one K step against mc <= kMaxM rows of A (read through L1).
  static __device__ __forceinline__ void fma(const Loads& v, const Element* arow, int k, int mc,
                                             int base, Acc& acc) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kk = base + u * kWarpK;
      if (kk >= k) break;
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

  // Warp-reduce the rows' sums, apply the epilogue, store rows row0 + r < row_end; zero acc.
  static __device__ __forceinline__ void store(Acc& acc, ElementD* d, int n, int m0, int mc,
                                               int row0, int row_end) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i >= mc) break;  // those accumulators stayed zero
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float sum = acc[i][r];
        acc[i][r] = 0.f;
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (threadIdx.x % 32 == 0 && row0 + r < row_end) {
          if constexpr (kEpilogue == kRelu2) sum = Relu2<float>()(sum);
          d[static_cast<size_t>(m0 + i) * n + row0 + r] = from_float<ElementD>(sum);
        }
      }
    }
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
        fma(v, arow, k, mc, base, acc);
      }
      store(acc, d, n, m0, mc, row0, n);
    }
  }

  // One warp, the span schedule: the row blocks row_begin, row_begin + stride * kRowsPerWarp,
  // ... below row_end of one group, as one stream of K steps whose next step's loads are issued
  // before the current step's FMAs (two register buffers), across row boundaries too.
  static __device__ void span(const Element* __restrict__ a, const Element* __restrict__ b,
                              ElementD* __restrict__ d, int m, int n, int k, int row_begin,
                              int row_end, int stride) {
    const int lane_base = threadIdx.x % 32 * kVec;
    const int row_step = stride * kRowsPerWarp;
    for (int m0 = 0; m0 < m; m0 += kMaxM) {  // more rows of A re-stream the span per pass
      const int mc = min(kMaxM, m - m0);
      const Element* arow = a + static_cast<size_t>(m0) * k;
      // Cursors, warp-uniform (the lane's columns are kk + lane_base + u * kWarpK): the step
      // being loaded (lrow, lk) runs one ahead of the step being summed (crow, ck).
      int lrow = row_begin, lk = 0, crow = row_begin, ck = 0;
      auto advance = [&](int& row, int& kk) {
        kk += kStepK;
        if (kk >= k) kk = 0, row += row_step;
      };
      auto issue = [&](Loads& v) {
        const Element* brow[kRowsPerWarp];
        rows(b, n, k, lrow, brow);
        load(brow, k, lk + lane_base, v);
        advance(lrow, lk);
      };
      auto consume = [&](const Loads& v, Acc& acc) {
        fma(v, arow, k, mc, ck + lane_base, acc);
        if (ck + kStepK >= k) store(acc, d, n, m0, mc, crow, row_end);  // the rows' last step
        advance(crow, ck);
      };
      // Named buffers rather than an indexed pair, so both stay in registers.
      Loads v0, v1;
      Acc acc;
      zero(acc);
      if (lrow < row_end) issue(v0);
      while (crow < row_end) {
        if (lrow < row_end) issue(v1);
        consume(v0, acc);
        if (crow >= row_end) break;
        if (lrow < row_end) issue(v0);
        consume(v1, acc);
      }
    }
  }
};

// first[g]: index of group g's first item, one block-wide scan per CTA over the shapes (a group
// without rows has no items); returns the number of items.
template <class G>
__device__ int scan_items(int groups, const int32_t* __restrict__ mnk, int* first) {
  __shared__ int warp_sums[kWarps];
  __shared__ int carry;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int running = 0;  // items of the groups before this chunk
  for (int g0 = 0; g0 < groups; g0 += kThreads) {
    const int g = g0 + threadIdx.x;
    int items = 0;
    if (g < groups && mnk[3 * g] > 0)
      items = (mnk[3 * g + 1] + G::kRowsPerItem - 1) / G::kRowsPerItem;
    int incl = items;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int before = running;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    if (g < groups) first[g] = before + incl - items;
    if (threadIdx.x == kThreads - 1) carry = before + incl;
    __syncthreads();
    running = carry;
    __syncthreads();  // warp_sums and carry are rewritten by the next chunk
  }
  return running;
}

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
  const int total = scan_items<G>(groups, mnk, first);
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
grouped_span_kernel(int groups, const int32_t* __restrict__ mnk,
                    const void* const* __restrict__ ptr_a, const void* const* __restrict__ ptr_b,
                    void* const* __restrict__ ptr_d) {
  using Element = typename G::Element;
  using ElementD = typename G::ElementD;
  extern __shared__ int first[];
  const int total = scan_items<G>(groups, mnk, first);
  // The CTA's run [begin, end) of items, in row blocks of kRowsPerWarp: warp w takes blocks w,
  // w + kWarps, ... of it.
  const int warp = threadIdx.x / 32;
  const int begin = static_cast<int>(static_cast<int64_t>(total) * blockIdx.x / gridDim.x);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (blockIdx.x + 1) / gridDim.x);
  if (begin >= end) return;
  for (int g = group_of(first, groups, begin); g < groups && first[g] < end; ++g) {
    const int n = mnk[3 * g + 1];
    const int lo = max(begin, first[g]) - first[g];  // the run's part of group g, in items
    const int hi = (g + 1 < groups ? min(end, first[g + 1]) : end) - first[g];
    if (lo >= hi) continue;  // an empty group
    G::span(static_cast<const Element*>(ptr_a[g]), static_cast<const Element*>(ptr_b[g]),
            static_cast<ElementD*>(ptr_d[g]), mnk[3 * g], n, mnk[3 * g + 2],
            lo * G::kRowsPerItem + warp * G::kRowsPerWarp, min(n, hi * G::kRowsPerItem), kWarps);
  }
}

template <class G>
__global__ void __launch_bounds__(kThreads)
dense_kernel(int m, int n, int k, const typename G::Element* __restrict__ a,
             const typename G::Element* __restrict__ b, typename G::ElementD* __restrict__ d) {
  const int total = (n + G::kRowsPerItem - 1) / G::kRowsPerItem;
  const int row = (threadIdx.x / 32) * G::kRowsPerWarp;
  for (int it = blockIdx.x; it < total; it += gridDim.x)
    G::item(a, b, d, m, n, k, it * G::kRowsPerItem + row);
}

// The C ABI of every grouped-GEMM library (grouped_gemm_exports.j2). kSpan: the grouped kernel's
// schedule (see the top of this file); the dense kernel (one group, its rows dealt round-robin)
// runs the items schedule either way.
template <class Element_, int kRowsPerWarp, int kMaxM, int kEpilogue, bool kSpan>
struct GroupedGemv {
  using Items = Gemv<Element_, kRowsPerWarp, kMaxM, kEpilogue, 4>;
  // Two buffers of two loads per row: the registers of one buffer of four.
  using Span = Gemv<Element_, kRowsPerWarp, kMaxM, kEpilogue, 2>;

  static size_t workspace_size(int, int) { return 0; }

  template <class Kernel>
  static int blocks_per_sm(Kernel kernel, size_t smem) {
    int per_sm = 0;  // host-side occupancy query, no device work
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) !=
        cudaSuccess)
      return 0;
    return per_sm;
  }

  static int check(int sm_count, int raster, int swizzle) {
    if (sm_count <= 0) return fail(kBadArgument, "sm_count must be > 0");
    // The items have no 2-D tile grid to reorder.
    if (raster != 0 || swizzle != 1)
      return fail(kBadArgument, "gemv kernels take only raster 0 and swizzle 1");
    return kOk;
  }

  static int launched(const char* what) {
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
      return fail(kLaunchFailed, what, cudaGetErrorString(e));
    return kOk;
  }

  static int run(int groups, const int32_t* mnk, const void* const* ptr_a,
                 const void* const* ptr_b, void* const* ptr_d, void*, size_t, int sm_count,
                 int raster, int swizzle, cudaStream_t stream) {
    if (groups <= 0 || groups > kMaxGroups || mnk == nullptr || ptr_a == nullptr ||
        ptr_b == nullptr || ptr_d == nullptr)
      return fail(kBadArgument, "groups must be in 1..8192 and the shape/pointer arrays non-null");
    if (int s = check(sm_count, raster, swizzle); s != kOk) return s;
    const size_t smem = sizeof(int) * groups;  // at most 32 KB: no opt-in needed
    auto kernel = [] {
      if constexpr (kSpan) return grouped_span_kernel<Span>;
      else return grouped_items_kernel<Items>;
    }();
    const int per_sm = blocks_per_sm(kernel, smem);
    if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    kernel<<<per_sm * sm_count, kThreads, smem, stream>>>(groups, mnk, ptr_a, ptr_b, ptr_d);
    return launched("gemv launch");
  }

  static int run_dense(int m, int n, int k, const void* a, const void* b, void* d, void*,
                       size_t, int sm_count, int raster, int swizzle, cudaStream_t stream) {
    if (m < 0 || n <= 0 || k <= 0 || k % kVec || a == nullptr || b == nullptr || d == nullptr)
      return fail(kBadArgument, "m >= 0, n > 0, k > 0 a multiple of 8, non-null pointers");
    if (int s = check(sm_count, raster, swizzle); s != kOk) return s;
    if (m == 0) return kOk;
    auto kernel = dense_kernel<Items>;
    const int per_sm = blocks_per_sm(kernel, 0);
    if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    const int items = (n + Items::kRowsPerItem - 1) / Items::kRowsPerItem;
    kernel<<<min(items, per_sm * sm_count), kThreads, 0, stream>>>(
        m, n, k, static_cast<const typename Items::Element*>(a),
        static_cast<const typename Items::Element*>(b),
        static_cast<typename Items::ElementD*>(d));
    return launched("gemv launch");
  }
};

}  // namespace autotune::gemv

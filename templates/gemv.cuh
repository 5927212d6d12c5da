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
// pass: correct for any M, fast for M <= kMaxM). Persistent CTAs walk the items of all non-empty
// groups in order, so neighbouring CTAs share a group's A rows in L2.
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
constexpr int kWarpK = 32 * kVec;     // K elements one warp covers per step
constexpr int kUnroll = 4;            // steps whose loads are issued before their FMAs
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

template <class Element_, int kRowsPerWarp, int kMaxM, int kEpilogue>
struct Gemv {
  using Element = Element_;
  using ElementD = std::conditional_t<kEpilogue == kFloat32Out, float, Element>;
  static constexpr int kRowsPerItem = kRowsPerWarp * kWarps;

  // D[0:m, n0:n0+kRowsPerItem] of one group; a [m, k], b [n, k], d [m, n] row-major.
  static __device__ void item(const Element* __restrict__ a, const Element* __restrict__ b,
                              ElementD* __restrict__ d, int m, int n, int k, int n0) {
    const int lane = threadIdx.x % 32;
    const int row0 = n0 + (threadIdx.x / 32) * kRowsPerWarp;
    const Element* brow[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)  // rows past n re-read row n-1 and are not stored
      brow[r] = b + static_cast<size_t>(min(row0 + r, n - 1)) * k;
    for (int m0 = 0; m0 < m; m0 += kMaxM) {
      const int mc = min(kMaxM, m - m0);
      const Element* arow = a + static_cast<size_t>(m0) * k;
      float acc[kMaxM][kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kMaxM; ++i)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[i][r] = 0.f;
      for (int base = lane * kVec; base < k; base += kUnroll * kWarpK) {
        uint4 bv[kUnroll][kRowsPerWarp];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            if (base + u * kWarpK < k) bv[u][r] = load_stream(brow[r] + base + u * kWarpK);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int kk = base + u * kWarpK;
          if (kk >= k) break;
          float bf[kRowsPerWarp][kVec];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) to_float<Element>(bv[u][r], bf[r]);
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
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i < mc) {
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            float v = acc[i][r];
#pragma unroll
            for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0 && row0 + r < n) {
              if constexpr (kEpilogue == kRelu2) v = Relu2<float>()(v);
              d[static_cast<size_t>(m0 + i) * n + row0 + r] = from_float<ElementD>(v);
            }
          }
        }
      }
    }
  }
};

template <class G>
__global__ void __launch_bounds__(kThreads)
grouped_kernel(int groups, const int32_t* __restrict__ mnk, const void* const* __restrict__ ptr_a,
               const void* const* __restrict__ ptr_b, void* const* __restrict__ ptr_d) {
  using Element = typename G::Element;
  using ElementD = typename G::ElementD;
  // first[g]: index of group g's first item; one block-wide scan per CTA over the shapes (a
  // group without rows has no items).
  extern __shared__ int first[];
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
  const int total = running;
  for (int it = blockIdx.x; it < total; it += gridDim.x) {
    int lo = 0, hi = groups - 1;  // the last group whose first item is <= it
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first[mid] <= it) lo = mid; else hi = mid - 1;
    }
    G::item(static_cast<const Element*>(ptr_a[lo]), static_cast<const Element*>(ptr_b[lo]),
            static_cast<ElementD*>(ptr_d[lo]), mnk[3 * lo], mnk[3 * lo + 1], mnk[3 * lo + 2],
            (it - first[lo]) * G::kRowsPerItem);
  }
}

template <class G>
__global__ void __launch_bounds__(kThreads)
dense_kernel(int m, int n, int k, const typename G::Element* __restrict__ a,
             const typename G::Element* __restrict__ b, typename G::ElementD* __restrict__ d) {
  const int total = (n + G::kRowsPerItem - 1) / G::kRowsPerItem;
  for (int it = blockIdx.x; it < total; it += gridDim.x)
    G::item(a, b, d, m, n, k, it * G::kRowsPerItem);
}

// The C ABI of every grouped-GEMM library (grouped_gemm_exports.j2).
template <class Element_, int kRowsPerWarp, int kMaxM, int kEpilogue>
struct GroupedGemv {
  using G = Gemv<Element_, kRowsPerWarp, kMaxM, kEpilogue>;

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
    auto kernel = grouped_kernel<G>;
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
    auto kernel = dense_kernel<G>;
    const int per_sm = blocks_per_sm(kernel, 0);
    if (per_sm <= 0) return fail(kCannotImplement, "the kernel does not fit on this device");
    const int items = (n + G::kRowsPerItem - 1) / G::kRowsPerItem;
    kernel<<<min(items, per_sm * sm_count), kThreads, 0, stream>>>(
        m, n, k, static_cast<const typename G::Element*>(a),
        static_cast<const typename G::Element*>(b), static_cast<typename G::ElementD*>(d));
    return launched("gemv launch");
  }
};

}  // namespace autotune::gemv

// Device-side routing and bookkeeping of the latent MoE forward: top-k selection, per-expert
// counts and offsets, the grouped GEMMs' shapes and pointer arrays, the row gather, the SwiGLU
// activation and the weighted combine. Every kernel runs on the caller's stream and reads its
// sizes from device memory, so the forward never synchronises with the host.
//
// moe_routing.cu.j2 instantiates these for one element type and exports them as extern "C".
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <utility>

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_facts.cuh"
#include "pdl.cuh"

#define AUTOTUNE_EXPORT extern "C" __attribute__((visibility("default")))

namespace autotune::routing {

inline thread_local char g_last_error[512] = "";

inline int check_launch(const char* what, cudaError_t e = cudaGetLastError()) {
  if (e == cudaSuccess) return 0;
  std::snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what, cudaGetErrorString(e));
  return 5;
}

// The kernel launch of every routing entry point, early where kPdl (pdl.cuh); 0, or 5 with the
// error in g_last_error.
template <bool kPdl, class... Params, class... Args>
int launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
           cudaStream_t stream, Args&&... args) {
  return check_launch(
      what, pdl::launch<kPdl>(kernel, grid, block, smem, stream, std::forward<Args>(args)...));
}

constexpr int kWarp = 32;
constexpr int kRouteWarps = 4;
constexpr int kMaxExperts = 4096;  // the offsets scan the counts within one block
constexpr int kZeroThreads = 1024;
constexpr int kMaxGroups = 128;    // n_group bound of the grouped top-k
constexpr int kListMax = 2 * kWarp;  // the register top-k's top_k bound

struct RouteArgs {
  const float* logits;   // [T, ld]: column hi_col + e holds the router's high part for expert e
  int64_t ld;
  int hi_col, lo_col;    // lo_col < 0: no low part (an fp32 or single-part router)
  const float* bias;     // [E] e_score_correction_bias, or null
  int tokens, experts, top_k, n_group, topk_group;
  int softmax;           // 0: sigmoid scoring, 1: softmax scoring
  int renormalize;
  float scale;           // routed_scaling_factor
  int32_t* topk_ids;     // [T, k] out
  float* topk_weights;   // [T, k] out
  int32_t* counts;       // [E] in/out, zero before the launch
  int32_t* slot;         // [T, k] out: rank of the pair within its expert
};

// Clears the per-expert counts before the routing kernel's atomics. A kernel rather than
// cudaMemsetAsync: in a CUDA graph the memset node cost ~1.3 us plus ~6 us of gaps around it
// before the next kernel node (H200, T = 2048), where one kernel follows another after ~0.3 us.
__global__ void __launch_bounds__(kZeroThreads) zero_kernel(int32_t* p, int n) {
  pdl::enter();
  for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = 0;
}

__device__ inline float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Largest value, lowest index on ties (a deterministic top-k order).
__device__ inline void warp_argmax(float& v, int& i) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
  }
}

__device__ inline float logit(const RouteArgs& a, int t, int e) {
  const float* row = a.logits + t * a.ld;
  return row[a.hi_col + e] + (a.lo_col >= 0 ? row[a.lo_col + e] : 0.f);
}

// Unbiased score of every expert into `score`, biased choice value into `choice`.
__device__ void score_token(const RouteArgs& a, int t, int lane, float* score, float* choice) {
  float mx = -INFINITY;
  for (int e = lane; e < a.experts; e += kWarp) {
    float l = logit(a, t, e);
    score[e] = l;
    mx = fmaxf(mx, l);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  if (a.softmax) {
    for (int e = lane; e < a.experts; e += kWarp) sum += __expf(score[e] - mx);
    sum = warp_sum(sum);
  }
  for (int e = lane; e < a.experts; e += kWarp) {
    float s = a.softmax ? __expf(score[e] - mx) / sum : 1.f / (1.f + __expf(-score[e]));
    score[e] = s;
    choice[e] = s + (a.bias ? a.bias[e] : 0.f);
  }
  __syncwarp();
}

// DeepSeek-V3 grouped top-k: keep the topk_group groups whose score (sum of the two highest
// biased values for sigmoid, the maximum for softmax) is largest; mask the rest to -inf.
// gscore and kept: the warp's scratch, n_group (<= kMaxGroups) entries each.
__device__ void mask_groups(const RouteArgs& a, int lane, float* choice, float* gscore,
                            int* kept) {
  if (a.n_group <= 1) return;
  int size = a.experts / a.n_group;
  for (int g = lane; g < a.n_group; g += kWarp) {
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int i = 0; i < size; ++i) {
      float v = choice[g * size + i];
      if (v > b1) b2 = b1, b1 = v;
      else if (v > b2) b2 = v;
    }
    gscore[g] = (a.softmax || size == 1) ? b1 : b1 + b2;
    kept[g] = 0;
  }
  __syncwarp();
  for (int round = 0; round < a.topk_group; ++round) {
    float v = -INFINITY;
    int i = a.n_group;
    for (int g = lane; g < a.n_group; g += kWarp)
      if (!kept[g] && (gscore[g] > v || (gscore[g] == v && g < i))) v = gscore[g], i = g;
    warp_argmax(v, i);
    if (i >= a.n_group) {  // only -inf/NaN left: keep the lowest group not yet kept
      for (i = 0; i < a.n_group && kept[i]; ++i) {}
    }
    if (lane == 0) kept[i] = 1;
    __syncwarp();
  }
  for (int e = lane; e < a.experts; e += kWarp)
    if (!kept[e / size]) choice[e] = -INFINITY;
  __syncwarp();
}

__global__ void __launch_bounds__(kRouteWarps* kWarp) route_kernel(RouteArgs a) {
  extern __shared__ float smem[];
  pdl::enter();
  int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int t = blockIdx.x * kRouteWarps + warp;
  if (t >= a.tokens) return;
  float* score = smem + warp * 2 * a.experts;
  float* choice = score + a.experts;
  score_token(a, t, lane, score, choice);
  __shared__ float gscore[kRouteWarps][kMaxGroups];
  __shared__ int kept[kRouteWarps][kMaxGroups];
  mask_groups(a, lane, choice, gscore[warp], kept[warp]);
  float picked_sum = 0.f;
  for (int j = 0; j < a.top_k; ++j) {
    float v = -INFINITY;
    int i = a.experts;
    for (int e = lane; e < a.experts; e += kWarp)
      if (choice[e] > v || (choice[e] == v && e < i)) v = choice[e], i = e;
    warp_argmax(v, i);
    if (i >= a.experts) i = j % a.experts;  // all remaining -inf/NaN: keep ids in range
    if (lane == 0) {
      choice[i] = -INFINITY;
      a.topk_ids[t * a.top_k + j] = i;
      a.topk_weights[t * a.top_k + j] = score[i];
    }
    picked_sum += score[i];
    __syncwarp();
  }
  float norm = a.renormalize ? 1.f / (picked_sum + 1e-20f) : 1.f;
  for (int j = lane; j < a.top_k; j += kWarp) {
    int e = a.topk_ids[t * a.top_k + j];
    a.topk_weights[t * a.top_k + j] *= norm * a.scale;
    a.slot[t * a.top_k + j] = atomicAdd(a.counts + e, 1);
  }
}

// Register-resident variant for E <= 32 * PerLane: lane l holds experts l, l + 32, ... as
// order-preserving keys, and the top_k are found by a bisection on the keys' bits (one warp-wide
// count per bit, 32 in all) rather than top_k argmax rounds. At 512 experts and top-22 on an
// H200: route kernel 68 -> 47 us at T = 8192, 19.9 -> 18.0 at 2048, 13.7 -> 10.4 at 16 (one
// warp's share), but 6.3 -> 7.2 us at T = 2 to 4, where one round's latency is all there is.
__device__ inline unsigned ordered_key(float v) {
  unsigned u = __float_as_uint(v);
  // Order-preserving map of floats to unsigned; 0 is kept for padding (below -inf).
  return ((u & 0x80000000u) ? ~u : (u | 0x80000000u)) | 1u;
}

// The k-th largest of the warp's keys, bit by bit from the top: the largest t with
// count(key >= t) >= k. The bisection stops as soon as exactly k keys are >= the probe: the
// k-th and the (k+1)-th key differ above the bits left, so the picks are the keys >= that
// threshold, with no tie to break, and the threshold serves as the k-th key (every key >= it is
// either above it or equal to it, and all of them are picked). Random router scores stop after
// ~16 of the 32 rounds; measured on an H200 (NOTES.md v16): route kernel 18.7 -> 16.3 us at
// T = 2048, 48.7 -> 44.3 at 8192, the one-block kernel 10.5 -> 9.0 at T = 1. (Two bits per
// round, three counts each, halve the dependent rounds but not the work: measured 3% faster at
// T = 2 and 2048, 7-20% slower at T = 8, 16 and 8192.)
template <int PerLane>
__device__ inline unsigned warp_kth_key(const unsigned (&key)[PerLane], int k) {
  unsigned kth = 0;
  for (int b = 31; b >= 0; --b) {
    const unsigned probe = kth | (1u << b);
    unsigned n = 0;
#pragma unroll
    for (int r = 0; r < PerLane; ++r) n += key[r] >= probe;
    const int at_least = int(__reduce_add_sync(0xffffffffu, n));  // the same in every lane
    if (at_least >= k) kth = probe;
    if (at_least == k) break;
  }
  return kth;
}

// A token's picks, in any order, in shared memory: key, expert and (unbiased) score each.
struct PickList {
  unsigned* key;
  int32_t* expert;
  float* score;
};

// Writes token t's top_k picks from `list` through one warp, ranked by key descending and expert
// ascending (the order of a stable sort): ids, weights (renormalised over the picks, then
// scaled) and each pair's slot, its atomicAdd on counts (global or shared).
__device__ inline void write_ranked(const RouteArgs& a, int t, int lane, const PickList& list,
                                    int32_t* counts) {
  const int k = a.top_k;  // <= 2 * kWarp
  unsigned key[2];
  int e[2], rank[2] = {0, 0};
  float s[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int j = lane + q * kWarp;
    const bool mine = j < k;
    key[q] = mine ? list.key[j] : 0u;
    e[q] = mine ? list.expert[j] : 0;
    s[q] = mine ? list.score[j] : 0.f;
  }
  for (int i = 0; i < k; ++i) {  // shared-memory broadcasts
    const unsigned ki = list.key[i];
    const int ei = list.expert[i];
#pragma unroll
    for (int q = 0; q < 2; ++q) rank[q] += ki > key[q] || (ki == key[q] && ei < e[q]);
  }
  // The scores summed in rank order, whatever order the list came in: the weights are
  // deterministic and equal on every path.
  __syncwarp();
#pragma unroll
  for (int q = 0; q < 2; ++q)
    if (lane + q * kWarp < k) list.score[rank[q]] = s[q];
  __syncwarp();
  float ranked = 0.f;
#pragma unroll
  for (int q = 0; q < 2; ++q)
    if (lane + q * kWarp < k) ranked += list.score[lane + q * kWarp];
  const float norm = (a.renormalize ? 1.f / (warp_sum(ranked) + 1e-20f) : 1.f) * a.scale;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    if (lane + q * kWarp < k) {
      const int out = t * k + rank[q];
      a.topk_ids[out] = e[q];
      a.topk_weights[out] = s[q] * norm;
      a.slot[out] = atomicAdd(counts + e[q], 1);
    }
  }
}

// Token t, one warp. buf (E floats), gscore and kept (n_group each): the warp's scratch for
// the grouped top-k, unused without groups; list: the warp's kListMax-entry pick list. counts:
// global or shared, the pair's slot is its atomicAdd there. An expert is picked at most once;
// ties at the k-th key go to the lowest experts.
template <int PerLane>
__device__ void route_token_regs(const RouteArgs& a, int t, int lane, float* buf, float* gscore,
                                 int* kept, const PickList& list, int32_t* counts) {
  float score[PerLane], choice[PerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int r = 0; r < PerLane; ++r) {
    int e = lane + r * kWarp;
    score[r] = e < a.experts ? logit(a, t, e) : -INFINITY;
    mx = fmaxf(mx, score[r]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  if (a.softmax) {
#pragma unroll
    for (int r = 0; r < PerLane; ++r)
      sum += lane + r * kWarp < a.experts ? __expf(score[r] - mx) : 0.f;
    sum = warp_sum(sum);
  }
#pragma unroll
  for (int r = 0; r < PerLane; ++r) {
    int e = lane + r * kWarp;
    float l = score[r];
    score[r] = a.softmax ? __expf(l - mx) / sum : 1.f / (1.f + __expf(-l));
    float c = score[r] + (a.bias && e < a.experts ? a.bias[e] : 0.f);
    choice[r] = c != c ? -INFINITY : c;  // NaN never wins
  }
  if (a.n_group > 1) {  // the group rule needs whole groups: go through shared memory once
#pragma unroll
    for (int r = 0; r < PerLane; ++r)
      if (lane + r * kWarp < a.experts) buf[lane + r * kWarp] = choice[r];
    __syncwarp();
    mask_groups(a, lane, buf, gscore, kept);
#pragma unroll
    for (int r = 0; r < PerLane; ++r)
      if (lane + r * kWarp < a.experts) choice[r] = buf[lane + r * kWarp];
  }
  unsigned key[PerLane];
#pragma unroll
  for (int r = 0; r < PerLane; ++r)
    key[r] = lane + r * kWarp < a.experts ? ordered_key(choice[r]) : 0u;
  const unsigned kth = warp_kth_key(key, a.top_k);
  unsigned above = 0;
#pragma unroll
  for (int r = 0; r < PerLane; ++r) above += key[r] > kth;
  // Picks at the k-th key, lowest experts first: expert lane + 32 r comes before every expert of
  // a later r and the lower lanes of its own.
  int ties = a.top_k - int(__reduce_add_sync(0xffffffffu, above));
  const unsigned lower = (1u << lane) - 1u;
  int filled = 0;
#pragma unroll
  for (int r = 0; r < PerLane; ++r) {
    const unsigned at_kth = __ballot_sync(0xffffffffu, key[r] == kth);
    const bool pick = key[r] > kth || (key[r] == kth && __popc(at_kth & lower) < ties);
    ties -= __popc(at_kth);
    const unsigned picks = __ballot_sync(0xffffffffu, pick);
    if (pick) {
      const int at = filled + __popc(picks & lower);
      list.key[at] = key[r], list.expert[at] = lane + r * kWarp, list.score[at] = score[r];
    }
    filled += __popc(picks);
  }
  __syncwarp();
  write_ranked(a, t, lane, list, counts);
}

template <int PerLane>
__global__ void __launch_bounds__(kRouteWarps* kWarp) route_kernel_regs(RouteArgs a) {
  extern __shared__ float smem[];
  pdl::enter();
  __shared__ float gscore[kRouteWarps][kMaxGroups];
  __shared__ int kept[kRouteWarps][kMaxGroups];
  __shared__ unsigned list_key[kRouteWarps][kListMax];
  __shared__ int32_t list_e[kRouteWarps][kListMax];
  __shared__ float list_score[kRouteWarps][kListMax];
  int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int t = blockIdx.x * kRouteWarps + warp;
  if (t >= a.tokens) return;
  route_token_regs<PerLane>(a, t, lane, smem + warp * a.experts, gscore[warp], kept[warp],
                            PickList{list_key[warp], list_e[warp], list_score[warp]}, a.counts);
}

struct OffsetArgs {
  const int32_t* counts;  // [E]
  int experts;
  int32_t* start;         // [E] out: first sorted row of each expert
  // Grouped GEMM 1 (up) and 2 (down), compacted: active experts first, empty groups after.
  int32_t* mnk1;          // [E, 3]
  int64_t* ptrs1;         // [3, E]: A, B, D addresses
  int32_t* mnk2;
  int64_t* ptrs2;
  int64_t a1, w_up, h1, h2, w_down, y2;  // base addresses
  int width, up_rows, inter, elem_bytes;
};

// Starts, shapes and pointer arrays of both grouped GEMMs from the per-expert counts (global or
// shared memory), one block of Threads threads, each over a contiguous chunk of experts (read
// twice rather than held in per-thread arrays: no registers scale with the expert count).
// start_copy: a second destination of the starts (shared memory), or null; with to_global
// false the block only fills start_copy.
template <int Threads>
__device__ void write_offsets(const OffsetArgs& a, const int32_t* counts, int32_t* start_copy,
                              bool to_global = true) {
  using Scan = cub::BlockScan<int, Threads>;
  __shared__ typename Scan::TempStorage tmp;
  const int chunk = (a.experts + Threads - 1) / Threads;
  const int lo = min(a.experts, int(threadIdx.x) * chunk), hi = min(a.experts, lo + chunk);
  int rows = 0, active = 0;
  for (int e = lo; e < hi; ++e) {
    const int c = counts[e];
    rows += c, active += c > 0;
  }
  int first, group, n_active;
  Scan(tmp).ExclusiveSum(rows, first);
  __syncthreads();
  Scan(tmp).ExclusiveSum(active, group, n_active);
  const int64_t es = a.elem_bytes;
  for (int e = lo; e < hi; ++e) {
    const int c = counts[e];
    if (start_copy) start_copy[e] = first;
    if (to_global) {
      a.start[e] = first;
      // Active experts take groups 0..n_active-1; the empty ones fill the tail with M = 0, so
      // the tile scheduler meets every real group before any empty one.
      const int g = c > 0 ? group : n_active + (e - group);
      const int64_t row = first;
      a.mnk1[3 * g] = c, a.mnk1[3 * g + 1] = a.up_rows, a.mnk1[3 * g + 2] = a.width;
      a.ptrs1[g] = a.a1 + row * a.width * es;
      a.ptrs1[a.experts + g] = a.w_up + int64_t(e) * a.up_rows * a.width * es;
      a.ptrs1[2 * a.experts + g] = a.h1 + row * a.up_rows * es;
      a.mnk2[3 * g] = c, a.mnk2[3 * g + 1] = a.width, a.mnk2[3 * g + 2] = a.inter;
      a.ptrs2[g] = a.h2 + row * a.inter * es;
      a.ptrs2[a.experts + g] = a.w_down + int64_t(e) * a.width * a.inter * es;
      a.ptrs2[2 * a.experts + g] = a.y2 + row * a.width * es;
    }
    first += c, group += c > 0;
  }
}

template <class To, class From>
__device__ inline To convert(From v) {
  return static_cast<To>(static_cast<float>(v));
}

// Eight consecutive source elements as floats, in 16-byte loads (the source row is 16-byte
// aligned: widths are multiples of 8 elements).
__device__ inline void load8(const float* p, float (&v)[8]) {
  float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <class T>
__device__ inline void load8(const T* p, float (&v)[8]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(e[i]);
}

// Eight floats converted to Element and stored in one 16-byte store (p 16-byte aligned).
template <class Element>
__device__ inline void store8(Element* p, const float (&v)[8]) {
  Element e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = convert<Element>(v[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(e);
}

// Pair p = t * top_k + j of token t goes to sorted row `row`: record it and copy the token's
// expert input there (converted to the GEMM's element type: the fused router+fc1 GEMM leaves
// fc1's output in fp32). One warp.
template <class Element, class Src>
__device__ inline void gather_pair(const Src* __restrict__ src, int64_t ld_src, int top_k,
                                   int width, int p, int row, int lane, Element* __restrict__ dst,
                                   int32_t* __restrict__ row_of) {
  if (lane == 0) row_of[p] = row;
  const Src* s = src + (p / top_k) * ld_src;
  Element* d = dst + int64_t(row) * width;
  for (int c = lane * 8; c < width; c += kWarp * 8) {
    float f[8];
    load8(s + c, f);
    store8(d + c, f);
  }
}

// The offsets and the gather of many tokens in one launch. Every block scans the counts into
// its own shared-memory starts (E words of dynamic shared memory; the same few hundred
// nanoseconds in every block), block 0 also writes the starts and both grouped GEMMs' shapes
// and pointer arrays; then the block's warps take pairs in a grid-stride loop. A separate
// one-block offsets kernel cost 6.2 us and its launch gap 0.4 us at T = 2048 (H200).
constexpr int kGatherThreads = 256;

template <class Element, class Src>
__global__ void __launch_bounds__(kGatherThreads)
offsets_gather_kernel(OffsetArgs o, int tokens, int top_k, const int32_t* __restrict__ topk_ids,
                      const int32_t* __restrict__ slot, const Src* __restrict__ src,
                      int64_t ld_src, Element* __restrict__ dst, int32_t* __restrict__ row_of) {
  extern __shared__ int32_t start[];
  pdl::enter();
  write_offsets<kGatherThreads>(o, o.counts, start, blockIdx.x == 0);
  __syncthreads();
  constexpr int kWarps = kGatherThreads / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int p = blockIdx.x * kWarps + threadIdx.x / kWarp; p < tokens * top_k;
       p += gridDim.x * kWarps)
    gather_pair(src, ld_src, top_k, o.width, p, start[topk_ids[p]] + slot[p], lane, dst, row_of);
}

// One token's expert input (width <= kOneRowWidth), read by route_gather_small_kernel before
// its top-k, the load's latency hidden behind it, and stored into the top_k sorted rows after
// it (at one token they are rows 0..top_k-1, whatever the order): teams of width / 8 threads
// (8 columns each) each load the row and store every teams-th copy; inactive, it does nothing.
// Gathering after the offsets cost a dependent load at the kernel's end; one shared row
// instead of copies made the layer slower (Ultra +1.2%, Super's up gemv +0.2-0.5 us: likely
// every SM reading the same few L2 lines).
struct OneTokenRow {
  int col, team, teams;
  bool loads;
  float v[8];

  template <class Src>
  __device__ OneTokenRow(bool active, const Src* src, int width, int threads) {
    const int chunks = max(1, width / 8);
    teams = threads / chunks, col = threadIdx.x % chunks * 8, team = threadIdx.x / chunks;
    loads = active && team < teams;
    if (loads) load8(src + col, v);
  }

  template <class Element>
  __device__ void store(Element* dst, int width, int top_k) const {
    if (loads)
      for (int j = team; j < top_k; j += teams) store8(dst + int64_t(j) * width + col, v);
  }
};

// Decode: route, count, offsets and gather of up to kSmallWarps tokens in one block, one launch
// instead of three (the zero, route and offsets+gather kernels). At one token the launches, not
// their work, were most of the routing time. Counts and starts live in shared memory.
constexpr int kSmallWarps = 16;
constexpr int kSmallThreads = kSmallWarps * kWarp;
constexpr int kSmallExperts = 1024;  // the register top-k's bound
constexpr int kPerThread = kSmallExperts / kSmallThreads;
// Dynamic shared memory of the one-launch path without an opt-in: 48 KB less the kernel's own
// static shared memory (block scan and reduction scratch, ~2.3 KB).
constexpr size_t kSmallSmemLimit = 44 * 1024;
// Widest expert input a one-token launch loads up front (8 columns per thread) instead of
// gathering it at the end.
constexpr int kOneRowWidth = kSmallThreads * 8;

// Dynamic shared memory, in 4-byte words: counts and starts [E] each, the per-warp pick lists
// (key, expert and score, kListMax each), and per warp E + 2 * n_group words of grouped top-k
// scratch when n_group > 1.
inline size_t small_smem(int experts, int n_group) {
  size_t per_warp = n_group > 1 ? size_t(experts) + 2 * size_t(n_group) : 0;
  return sizeof(int32_t) * (2 * size_t(experts) + kSmallWarps * (3 * kListMax + per_warp));
}

__device__ inline float block_reduce(float v, bool max, float* scratch) {
  v = max ? warp_max(v) : warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kSmallWarps; ++w) v = max ? fmaxf(v, scratch[w]) : v + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return v;
}

// Token 0 with the whole block (decode at T = 1): route_token_regs's bisection with a block-wide
// count per bit (one barrier-reduction each), the picks gathered into `list` and ranked and
// written by warp 0. Same experts, order and weights as route_token_regs. buf, gscore, kept: the
// grouped top-k scratch; list: kListMax entries; counts: shared, zeroed.
__device__ void route_one_token_block(const RouteArgs& a, float* buf, float* gscore, int* kept,
                                      const PickList& list, int32_t* counts) {
  __shared__ float scratch[kSmallWarps];
  __shared__ int ties_of[kPerThread * kSmallWarps];  // keys at the k-th, per (row, warp)
  __shared__ int filled;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  // Expert threadIdx.x + p * kSmallThreads is the thread's item p; rows past the experts are
  // skipped block-uniformly.
  const int rows = (a.experts + kSmallThreads - 1) / kSmallThreads;
  float score[kPerThread];
  float mx = -INFINITY;
#pragma unroll
  for (int p = 0; p < kPerThread; ++p) {
    int e = threadIdx.x + p * kSmallThreads;
    score[p] = e < a.experts ? logit(a, 0, e) : -INFINITY;
    mx = fmaxf(mx, score[p]);
  }
  float sum = 1.f;
  if (a.softmax) {
    mx = block_reduce(mx, true, scratch);
    float part = 0.f;
#pragma unroll
    for (int p = 0; p < kPerThread; ++p)
      part += threadIdx.x + p * kSmallThreads < a.experts ? __expf(score[p] - mx) : 0.f;
    sum = block_reduce(part, false, scratch);
  }
  float choice[kPerThread];
#pragma unroll
  for (int p = 0; p < kPerThread; ++p) {
    int e = threadIdx.x + p * kSmallThreads;
    choice[p] = -INFINITY;
    if (e < a.experts) {
      float l = score[p];
      score[p] = a.softmax ? __expf(l - mx) / sum : 1.f / (1.f + __expf(-l));
      float c = score[p] + (a.bias ? a.bias[e] : 0.f);
      choice[p] = c != c ? -INFINITY : c;  // NaN never wins
      if (a.n_group > 1) buf[e] = choice[p];
    }
  }
  if (a.n_group > 1) {  // the group rule needs whole groups: one warp over shared memory
    __syncthreads();
    if (warp == 0) mask_groups(a, lane, buf, gscore, kept);
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kPerThread; ++p)
      if (threadIdx.x + p * kSmallThreads < a.experts)
        choice[p] = buf[threadIdx.x + p * kSmallThreads];
  }
  unsigned key[kPerThread];
#pragma unroll
  for (int p = 0; p < kPerThread; ++p)
    key[p] = threadIdx.x + p * kSmallThreads < a.experts ? ordered_key(choice[p]) : 0u;
  if (threadIdx.x == 0) filled = 0;  // ordered before its use by the barriers below
  auto count = [&](unsigned at_least) {
    int n = 0;
#pragma unroll
    for (int p = 0; p < kPerThread; ++p)
      if (p < rows) n += __syncthreads_count(key[p] >= at_least);
    return n;
  };
  unsigned kth = 0;  // as warp_kth_key, the block counting each bit (and stopping as early)
  for (int b = 31; b >= 0; --b) {
    const unsigned probe = kth | (1u << b);
    const int at_least = count(probe);
    if (at_least >= a.top_k) kth = probe;
    if (at_least == a.top_k) break;
  }
  int ties = a.top_k - (kth == ~0u ? 0 : count(kth + 1));  // picks at the k-th key
  const unsigned lower = (1u << lane) - 1u;
  unsigned at_kth[kPerThread];
#pragma unroll
  for (int p = 0; p < kPerThread; ++p) {
    at_kth[p] = __ballot_sync(0xffffffffu, key[p] == kth);
    if (lane == 0) ties_of[p * kSmallWarps + warp] = __popc(at_kth[p]);
  }
  __syncthreads();
#pragma unroll
  for (int p = 0; p < kPerThread; ++p) {
    bool pick = key[p] > kth;
    if (key[p] == kth) {  // lowest experts first: earlier rows, then earlier warps and lanes
      int before = __popc(at_kth[p] & lower);
      for (int i = 0; i < p * kSmallWarps + warp; ++i) before += ties_of[i];
      pick = before < ties;
    }
    if (pick) {
      const int at = atomicAdd(&filled, 1);  // any order: write_ranked ranks them
      list.key[at] = key[p], list.expert[at] = threadIdx.x + p * kSmallThreads;
      list.score[at] = score[p];
    }
  }
  __syncthreads();
  if (warp == 0) write_ranked(a, 0, lane, list, counts);
}

template <int PerLane, class Element, class Src>
__global__ void __launch_bounds__(kSmallThreads)
route_gather_small_kernel(RouteArgs r, OffsetArgs o, const Src* __restrict__ src, int64_t ld_src,
                          Element* __restrict__ dst, int32_t* __restrict__ row_of) {
  extern __shared__ int32_t smem_words[];
  int32_t* counts = smem_words;
  int32_t* start = counts + r.experts;
  unsigned* list_key = reinterpret_cast<unsigned*>(start + r.experts);
  int32_t* list_e = reinterpret_cast<int32_t*>(list_key + kSmallWarps * kListMax);
  float* list_score = reinterpret_cast<float*>(list_e + kSmallWarps * kListMax);
  float* group_scratch = list_score + kSmallWarps * kListMax;
  int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  pdl::enter();
  const bool one_token = r.tokens == 1 && o.width <= kOneRowWidth;
  const OneTokenRow row(one_token, src, o.width, kSmallThreads);
  for (int e = threadIdx.x; e < r.experts; e += kSmallThreads) counts[e] = 0;
  __syncthreads();
  if (r.tokens == 1) {
    route_one_token_block(r, group_scratch, group_scratch + r.experts,
                          reinterpret_cast<int*>(group_scratch + r.experts + r.n_group),
                          PickList{list_key, list_e, list_score}, counts);
  } else if (warp < r.tokens) {
    float* buf = group_scratch + warp * (r.experts + 2 * r.n_group);
    const int at = warp * kListMax;
    route_token_regs<PerLane>(r, warp, lane, buf, buf + r.experts,
                              reinterpret_cast<int*>(buf + r.experts + r.n_group),
                              PickList{list_key + at, list_e + at, list_score + at}, counts);
  }
  __syncthreads();  // counts final; topk_ids and slot (global) visible to the whole block
  row.store(dst, o.width, r.top_k);  // the rows need no offsets: stored before them
  write_offsets<kSmallThreads>(o, counts, start);
  __syncthreads();
  if (one_token) {
    for (int p = threadIdx.x; p < r.top_k; p += kSmallThreads)
      row_of[p] = start[r.topk_ids[p]] + r.slot[p];
    return;
  }
  for (int p = warp; p < r.tokens * r.top_k; p += kSmallWarps)
    gather_pair(src, ld_src, r.top_k, o.width, p, start[r.topk_ids[p]] + r.slot[p], lane, dst,
                row_of);
}

// h2[r, i] = silu(h1[r, i]) * h1[r, I + i]: gated experts keep [gate; up] in one up projection.
template <class Element>
__global__ void swiglu_kernel(const Element* __restrict__ h1, Element* __restrict__ h2,
                              int64_t rows, int inter) {
  pdl::enter();
  int64_t n = rows * inter;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = idx / inter, i = idx % inter;
    float g = static_cast<float>(h1[r * 2 * inter + i]);
    float u = static_cast<float>(h1[r * 2 * inter + inter + i]);
    h2[idx] = convert<Element>(g / (1.f + __expf(-g)) * u);
  }
}

constexpr int kCombineThreads = 1024;     // block bound of the split combine
constexpr int kCombineSplitTokens = 128;  // up to this many tokens the pairs are split

// out[t] = sum_j w[t, j] * y[row_of(t, j)], accumulated in fp32 in the fixed order j = 0..k-1,
// so the result is deterministic (no atomics). A thread loads kCombineBatch pairs' rows before
// adding them (the same order): at a few hundred tokens (one block each) one row in flight per
// thread left the memory idle (standalone on an H200, NOTES.md v17: 16.1 -> 12.4 us at T = 512,
// unchanged at 2048 and 8192; bitwise equal; in the layer, Super T = 512 10.5 -> 7.1 us).
constexpr int kCombineBatch = 8;

template <class Element>
__global__ void combine_kernel(const Element* __restrict__ y, const float* __restrict__ weights,
                               const int32_t* __restrict__ row_of, int top_k, int width,
                               Element* __restrict__ out) {
  pdl::enter();
  int t = blockIdx.x;
  for (int c = threadIdx.x * 8; c < width; c += blockDim.x * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; j0 < top_k; j0 += kCombineBatch) {
      uint4 raw[kCombineBatch];
      float w[kCombineBatch];
#pragma unroll
      for (int u = 0; u < kCombineBatch; ++u) {
        const int j = j0 + u;
        if (j < top_k) {
          w[u] = weights[t * top_k + j];
          raw[u] =
              *reinterpret_cast<const uint4*>(y + int64_t(row_of[t * top_k + j]) * width + c);
        }
      }
#pragma unroll
      for (int u = 0; u < kCombineBatch; ++u) {
        if (j0 + u < top_k) {
          const Element* v = reinterpret_cast<const Element*>(&raw[u]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += w[u] * static_cast<float>(v[i]);
        }
      }
    }
    store8(out + int64_t(t) * width + c, acc);
  }
}

// The same sum for a few tokens, where combine_kernel leaves the GPU idle while each thread walks
// one dependent (row_of, y) chain per pair: here blockDim.x / splits threads cover the columns
// (8 each) and `splits` of them the pairs; split q sums pairs q, q + splits, ... in order and
// the splits' partial sums are added in order q = 0, 1, ... through shared memory
// ((splits - 1) * blockDim.x / splits * 8 floats). Deterministic too, in another fixed order.
template <class Element>
__global__ void combine_split_kernel(const Element* __restrict__ y,
                                     const float* __restrict__ weights,
                                     const int32_t* __restrict__ row_of, int top_k, int width,
                                     int splits, Element* __restrict__ out) {
  extern __shared__ float partial[];  // [splits - 1][cols * 8]: split 0 keeps its sum
  pdl::enter();
  const int t = blockIdx.x, cols = blockDim.x / splits;
  const int q = threadIdx.x / cols, c = threadIdx.x % cols * 8;
  for (int c0 = 0; c0 < width; c0 += cols * 8) {
    const int col = c0 + c;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (col < width) {
      for (int j = q; j < top_k; j += splits) {
        float w = weights[t * top_k + j];
        uint4 raw =
            *reinterpret_cast<const uint4*>(y + int64_t(row_of[t * top_k + j]) * width + col);
        const Element* v = reinterpret_cast<const Element*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += w * static_cast<float>(v[i]);
      }
      if (q > 0)
#pragma unroll
        for (int i = 0; i < 8; ++i) partial[(q - 1) * cols * 8 + c + i] = acc[i];
    }
    __syncthreads();
    if (q == 0 && col < width) {
      for (int p = 1; p < splits; ++p)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += partial[(p - 1) * cols * 8 + c + i];
      store8(out + int64_t(t) * width + col, acc);
    }
    __syncthreads();  // partial is rewritten by the next column chunk
  }
}

}  // namespace autotune::routing

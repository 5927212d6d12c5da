// Where the decode routing kernel's time goes, and the combine's two kernels at few tokens.
//
// Usage (on an sm90 GPU):
//   nvcc -arch=sm_90a -std=c++17 -O3 -Itemplates -o /tmp/routing_phases \
//        benchmarks/routing_phases.cu && /tmp/routing_phases
//
// The routing kernel is timed as the library launches it, and again as a copy of its body with
// clock64 stamps between the phases (zeroing the counts, top-k, offsets, gather; keep the copy
// in step with route_gather_small_kernel in templates/moe_routing.cuh); then the many-token
// path's kernels at T = 2048 and 8192. Super sizes: 512
// experts, top-22, sigmoid scoring with a bias, latent width 1024, fp32 router output.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "graph_timing.cuh"
#include "moe_routing.cuh"

namespace R = autotune::routing;
using bf16 = __nv_bfloat16;

__device__ long long stamps[16];

template <int PerLane, class Element, class Src>
__global__ void __launch_bounds__(R::kSmallThreads)
stamped_kernel(R::RouteArgs r, R::OffsetArgs o, const Src* __restrict__ src, int64_t ld_src,
               Element* __restrict__ dst, int32_t* __restrict__ row_of) {
  long long t0 = clock64();
  extern __shared__ int32_t smem_words[];
  int32_t* counts = smem_words;
  int32_t* start = counts + r.experts;
  unsigned* list_key = reinterpret_cast<unsigned*>(start + r.experts);
  int32_t* list_e = reinterpret_cast<int32_t*>(list_key + R::kSmallWarps * R::kListMax);
  float* list_score = reinterpret_cast<float*>(list_e + R::kSmallWarps * R::kListMax);
  float* group_scratch = list_score + R::kSmallWarps * R::kListMax;
  int warp = threadIdx.x / R::kWarp, lane = threadIdx.x % R::kWarp;
  const bool one_token = r.tokens == 1 && o.width <= R::kOneRowWidth;
  const R::OneTokenRow row(one_token, src, o.width, R::kSmallThreads);
  for (int e = threadIdx.x; e < r.experts; e += R::kSmallThreads) counts[e] = 0;
  __syncthreads();
  long long t1 = clock64();
  long long t2 = 0;
  if (r.tokens == 1) {
    R::route_one_token_block(r, group_scratch, group_scratch + r.experts,
                             reinterpret_cast<int*>(group_scratch + r.experts + r.n_group),
                             R::PickList{list_key, list_e, list_score}, counts);
    t2 = clock64();
  } else if (warp < r.tokens) {
    float* buf = group_scratch + warp * (r.experts + 2 * r.n_group);
    const int at = warp * R::kListMax;
    R::route_token_regs<PerLane>(r, warp, lane, buf, buf + r.experts,
                                 reinterpret_cast<int*>(buf + r.experts + r.n_group),
                                 R::PickList{list_key + at, list_e + at, list_score + at}, counts);
    t2 = clock64();
  }
  __syncthreads();
  long long t3 = clock64();
  row.store(dst, o.width, r.top_k);  // one token: its rows' stores go with the offsets phase
  R::write_offsets<R::kSmallThreads>(o, counts, start);
  __syncthreads();
  long long t4 = clock64();
  if (one_token) {
    for (int p = threadIdx.x; p < r.top_k; p += R::kSmallThreads)
      row_of[p] = start[r.topk_ids[p]] + r.slot[p];
  } else {
    for (int p = warp; p < r.tokens * r.top_k; p += R::kSmallWarps)
      R::gather_pair(src, ld_src, r.top_k, o.width, p, start[r.topk_ids[p]] + r.slot[p], lane,
                     dst, row_of);
  }
  __syncthreads();
  long long t5 = clock64();
  if (threadIdx.x == 0) {
    stamps[0] = t1 - t0; stamps[1] = t2 - t1; stamps[2] = t3 - t1; stamps[3] = t4 - t3;
    stamps[4] = t5 - t4; stamps[5] = t5 - t0;
  }
}

int main() {
  cudaStream_t st; CK(cudaStreamCreate(&st));
  int clock_khz; CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const int E = 512, K = 22, W = 1024, ld = 2 * E + W, maxT = 16;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> h(size_t(maxT) * ld), hb(E);
  for (auto& v : h) v = nd(rng);
  for (auto& v : hb) v = 0.01f * nd(rng);
  float *logits, *bias, *tw; int32_t *ids, *counts, *slot, *start, *mnk1, *mnk2, *row_of;
  int64_t *ptrs1, *ptrs2; bf16 *a1, *wup, *wdown, *h1, *h2, *y2;
  CK(cudaMalloc(&logits, h.size() * 4)); CK(cudaMemcpy(logits, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&bias, E * 4)); CK(cudaMemcpy(bias, hb.data(), E * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&tw, maxT * K * 4)); CK(cudaMalloc(&ids, maxT * K * 4)); CK(cudaMalloc(&slot, maxT * K * 4));
  CK(cudaMalloc(&row_of, maxT * K * 4)); CK(cudaMalloc(&counts, E * 4)); CK(cudaMalloc(&start, E * 4));
  CK(cudaMalloc(&mnk1, E * 12)); CK(cudaMalloc(&mnk2, E * 12)); CK(cudaMalloc(&ptrs1, E * 24)); CK(cudaMalloc(&ptrs2, E * 24));
  CK(cudaMalloc(&a1, size_t(maxT) * K * W * 2));
  wup = wdown = h1 = h2 = y2 = a1;
  auto addr = [](const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); };
  printf("clock %d MHz\n", clock_khz / 1000);
  for (int T : {1, 2, 4, 8, 16}) {
    R::RouteArgs r{logits, ld, 0, E, bias, T, E, K, 1, 1, 0, 1, 5.0f, ids, tw, counts, slot};
    R::OffsetArgs o{counts, E, start, mnk1, ptrs1, mnk2, ptrs2, addr(a1), addr(wup), addr(h1),
                    addr(h2), addr(wdown), addr(y2), W, 2688, 2688, 2};
    size_t smem = R::small_smem(E, 1);
    const float* src = logits + 2 * E;
    float real = graph_us([&](int, cudaStream_t s) {
      R::route_gather_small_kernel<16, bf16, float><<<1, R::kSmallThreads, smem, s>>>(r, o, src, ld, a1, row_of);
    }, st);
    float stamped = graph_us([&](int, cudaStream_t s) {
      stamped_kernel<16, bf16, float><<<1, R::kSmallThreads, smem, s>>>(r, o, src, ld, a1, row_of);
    }, st);
    long long hs[16];
    CK(cudaMemcpyFromSymbol(hs, stamps, sizeof(hs)));
    double us = 1e3 / clock_khz;
    printf("T=%2d route_gather_small %.2f us (stamped %.2f): zero %.2f | route(warp0) %.2f, all %.2f | offsets %.2f | gather %.2f | total in-kernel %.2f us\n",
           T, real, stamped, hs[0] * us, hs[1] * us, hs[2] * us, hs[3] * us, hs[4] * us, hs[5] * us);
  }
  // Many tokens: the three launches of the library's path (zero, route, offsets+gather), each
  // timed alone in a graph of ten.
  for (int T : {2048, 8192}) {
    float *lg, *w;
    int32_t *tid, *sl, *ro;
    bf16* dst;
    CK(cudaMalloc(&lg, size_t(T) * ld * 4)); CK(cudaMalloc(&w, size_t(T) * K * 4));
    CK(cudaMalloc(&tid, size_t(T) * K * 4)); CK(cudaMalloc(&sl, size_t(T) * K * 4));
    CK(cudaMalloc(&ro, size_t(T) * K * 4)); CK(cudaMalloc(&dst, size_t(T) * K * W * 2));
    std::vector<float> hl(size_t(T) * ld);
    for (auto& v : hl) v = nd(rng);
    CK(cudaMemcpy(lg, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice));
    R::RouteArgs r{lg, ld, 0, E, bias, T, E, K, 1, 1, 0, 1, 5.0f, tid, w, counts, sl};
    R::OffsetArgs o{counts, E, start, mnk1, ptrs1, mnk2, ptrs2, addr(dst), addr(wup), addr(h1),
                    addr(h2), addr(wdown), addr(y2), W, 2688, 2688, 2};
    const int blocks = (T + R::kRouteWarps - 1) / R::kRouteWarps;
    auto zero = [&](cudaStream_t s) { R::zero_kernel<<<1, R::kZeroThreads, 0, s>>>(counts, E); };
    auto route = [&](cudaStream_t s) {
      R::route_kernel_regs<16><<<blocks, R::kRouteWarps * R::kWarp, 0, s>>>(r);
    };
    int per_sm = 0, sms = 0;
    auto gk = R::offsets_gather_kernel<bf16, float>;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gk, R::kGatherThreads, E * 4));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int gblocks = std::min(T * K / (R::kGatherThreads / R::kWarp), sms * per_sm);
    auto gather = [&](cudaStream_t s) {
      gk<<<gblocks, R::kGatherThreads, E * 4, s>>>(o, T, K, tid, sl, lg + 2 * E, ld, dst, ro);
    };
    float tz = graph_us([&](int, cudaStream_t s) { zero(s); }, st);
    float tr = graph_us([&](int, cudaStream_t s) { zero(s); route(s); }, st) - tz;
    zero(st); route(st);
    float tg = graph_us([&](int, cudaStream_t s) { gather(s); }, st);
    printf("T=%5d zero %.2f us | route %.2f us | offsets+gather %.2f us (%d blocks)\n", T, tz, tr,
           tg, gblocks);
    cudaFree(lg); cudaFree(w); cudaFree(tid); cudaFree(sl); cudaFree(ro); cudaFree(dst);
  }
  // Combine: y [T*K, W] rows, row_of a permutation.
  for (int T : {1, 8, 64, 128, 256, 8192}) {
    bf16 *y, *out; float* w; int32_t* ro;
    CK(cudaMalloc(&y, size_t(T) * K * W * 2)); CK(cudaMalloc(&out, size_t(T) * W * 2 * 2));
    CK(cudaMalloc(&w, size_t(T) * K * 4)); CK(cudaMalloc(&ro, size_t(T) * K * 4));
    std::vector<int32_t> perm(size_t(T) * K); for (size_t i = 0; i < perm.size(); ++i) perm[i] = int(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<float> hw(size_t(T) * K); for (auto& v : hw) v = nd(rng);
    std::vector<uint16_t> hy(size_t(T) * K * W); for (size_t i = 0; i < hy.size(); ++i) hy[i] = 0x3f80 + (rng() & 0x7f) - 0x40;
    CK(cudaMemcpy(ro, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(y, hy.data(), hy.size() * 2, cudaMemcpyHostToDevice));
    float seq = graph_us([&](int, cudaStream_t s) {
      R::combine_kernel<bf16><<<T, 128, 0, s>>>(y, w, ro, K, W, out);
    }, st);
    std::string line;
    std::vector<uint16_t> ref(size_t(T) * W), got(size_t(T) * W);
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(ref.data(), out, ref.size() * 2, cudaMemcpyDeviceToHost));
    for (int splits : {2, 4, 8}) {
      size_t smem = sizeof(float) * (splits - 1) * 128 * 8;
      CK(cudaMemsetAsync(out, 0xff, size_t(T) * W * 2, st));
      float t = graph_us([&](int, cudaStream_t s) {
        R::combine_split_kernel<bf16><<<T, 128 * splits, smem, s>>>(y, w, ro, K, W, splits, out);
      }, st);
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost));
      double maxd = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        uint32_t a = uint32_t(ref[i]) << 16, b = uint32_t(got[i]) << 16;
        float fa, fb; memcpy(&fa, &a, 4); memcpy(&fb, &b, 4);
        maxd = std::max(maxd, double(std::fabs(fa - fb) / (std::fabs(fa) + 1e-3)));
      }
      char buf[96]; snprintf(buf, sizeof buf, " | split %d %.2f us (max rel %.1e)", splits, t, maxd);
      line += buf;
    }
    printf("combine T=%5d combine_kernel %.2f us%s\n", T, seq, line.c_str());
    cudaFree(y); cudaFree(out); cudaFree(w); cudaFree(ro);
  }
  return 0;
}

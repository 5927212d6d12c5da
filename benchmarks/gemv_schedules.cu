// The gemv kernel's two schedules (templates/gemv.cuh) on the Super preset's decode shapes,
// beside a plain read of the same weights (the bandwidth ceiling of that access pattern).
//
// Usage (on an sm90 GPU; CUTLASS headers for epilogues.cuh):
//   nvcc -arch=sm_90a -std=c++17 -O3 -Itemplates -I<cutlass>/include \
//        -o /tmp/gemv_schedules benchmarks/gemv_schedules.cu && /tmp/gemv_schedules
//
// Grouped: up (N = 2688, K = 1024) and down (N = 1024, K = 2688) of 22 or 44 active experts
// (T = 1, 2) among 512 groups, as the forward passes them, the active ones first; four expert
// sets rotate so the weights stream from DRAM. Dense: the router+fc1 and fc2 projections.
// Outputs are compared with the first gemv variant's (bitwise for the grouped ones: the same
// per-row arithmetic). Times are CUDA-graph replays of 10 calls, median of 15, per call.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>
#include <algorithm>
#include <random>
#include <cmath>
#include <cstring>

#include "gemv.cuh"
#include "graph_timing.cuh"
#include "moe_routing.cuh"

using bf16 = __nv_bfloat16;

__global__ void fill(bf16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);
  }
}

// Pure stream of the active blocks: the ceiling for this access pattern.
__global__ void read_blocks(const void* const* blocks, int nblocks, size_t chunks_per_block, unsigned* sink) {
  size_t total = chunks_per_block * nblocks;
  size_t stride = size_t(gridDim.x) * blockDim.x;
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      size_t j = i + u * stride;
      if (j < total) v[u] = autotune::gemv::load_stream(static_cast<const uint4*>(blocks[j / chunks_per_block]) + j % chunks_per_block);
      else v[u] = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

struct Case {
  int E, N, K, active, M;
  bf16* w;                 // [E, N, K]
  bf16* a;                 // [active*M, K]
  static constexpr int kSets = 4;
  int32_t* mnk[kSets][2];  // [0]: all E groups (active first), [1]: active only
  void** ptrs[kSets][2];   // [3, groups]
  void** blocks[kSets];
};

int main(int argc, char** argv) {
  const bool once = argc > 1;  // any argument: eager single launches (for a profiler)
  setvbuf(stdout, nullptr, _IONBF, 0);  // a hung variant still shows which one it was
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaStream_t st; CK(cudaStreamCreate(&st));
  unsigned* sink; CK(cudaMalloc(&sink, 4));
  std::mt19937 rng(1);
  struct Shape { const char* name; int N, K, active, M; };
  std::vector<Shape> shapes = {{"up T=1", 2688, 1024, 22, 1}, {"down T=1", 1024, 2688, 22, 1},
                               {"up T=2", 2688, 1024, 44, 1}, {"down T=2", 1024, 2688, 44, 1}};
  const int E = 512;
  bf16* wbuf[2];
  for (int i = 0; i < 2; ++i) {
    size_t n = size_t(E) * 2688 * 1024;
    CK(cudaMalloc(&wbuf[i], n * 2));
    fill<<<1024, 256>>>(wbuf[i], n, 17 + i);
  }
  CK(cudaDeviceSynchronize());
  if (once) shapes.resize(2);
  for (auto& sh : shapes) {
    Case c{E, sh.N, sh.K, sh.active, sh.M};
    c.w = (sh.K == 1024) ? wbuf[0] : wbuf[1];
    CK(cudaMalloc(&c.a, size_t(sh.active) * sh.M * sh.K * 2));
    fill<<<64, 256>>>(c.a, size_t(sh.active) * sh.M * sh.K, 99);
    for (int s = 0; s < Case::kSets; ++s) {
      std::vector<int> perm(E); for (int i = 0; i < E; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<int> ex(perm.begin(), perm.begin() + sh.active);
      std::sort(ex.begin(), ex.end());
      for (int v = 0; v < 2; ++v) {
        int groups = v == 0 ? E : sh.active;
        std::vector<int32_t> mnk(3 * groups, 0);
        std::vector<void*> ptrs(3 * groups, nullptr);
        for (int g = 0; g < groups; ++g) {
          mnk[3 * g + 1] = sh.N; mnk[3 * g + 2] = sh.K;
          if (g < sh.active) {
            mnk[3 * g] = sh.M;
            ptrs[g] = c.a + size_t(g) * sh.M * sh.K;
            ptrs[groups + g] = c.w + size_t(ex[g]) * sh.N * sh.K;
            ptrs[2 * groups + g] = nullptr;  // set per variant
          } else {
            ptrs[g] = c.a; ptrs[groups + g] = c.w; ptrs[2 * groups + g] = c.a;
          }
        }
        CK(cudaMalloc(&c.mnk[s][v], mnk.size() * 4));
        CK(cudaMemcpy(c.mnk[s][v], mnk.data(), mnk.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&c.ptrs[s][v], ptrs.size() * 8));
        CK(cudaMemcpy(c.ptrs[s][v], ptrs.data(), ptrs.size() * 8, cudaMemcpyHostToDevice));
      }
      std::vector<void*> bl(sh.active);
      for (int g = 0; g < sh.active; ++g) bl[g] = c.w + size_t(ex[g]) * sh.N * sh.K;
      CK(cudaMalloc(&c.blocks[s], bl.size() * 8));
      CK(cudaMemcpy(c.blocks[s], bl.data(), bl.size() * 8, cudaMemcpyHostToDevice));
    }
    // Output buffer; D pointers of active groups point into it.
    bf16* dout; CK(cudaMalloc(&dout, size_t(sh.active) * sh.M * sh.N * 2 * 2));
    for (int s = 0; s < Case::kSets; ++s)
      for (int v = 0; v < 2; ++v) {
        int groups = v == 0 ? E : sh.active;
        std::vector<void*> dp(sh.active);
        for (int g = 0; g < sh.active; ++g) dp[g] = dout + size_t(g) * sh.M * sh.N;
        CK(cudaMemcpy(c.ptrs[s][v] + 2 * groups, dp.data(), dp.size() * 8, cudaMemcpyHostToDevice));
      }
    double bytes = double(sh.active) * sh.N * sh.K * 2;
    using Fn = std::function<int(int set, cudaStream_t)>;
    std::vector<std::pair<std::string, Fn>> vars;
    auto grouped = [&](auto tag, bool all) {
      using K = decltype(tag);
      return Fn([&c, all, &sh, sms](int s, cudaStream_t t) {
        int v = all ? 0 : 1, groups = all ? 512 : sh.active;
        void** p = c.ptrs[s][v];
        return K::run(groups, c.mnk[s][v], (const void* const*)p, (const void* const*)(p + groups),
                      (void* const*)(p + 2 * groups), nullptr, 0, sms, 0, 1, t);
      });
    };
    namespace N = autotune::gemv;
    vars.push_back({"read 1056x128", [&c, &sh, sink, sms](int s, cudaStream_t t) {
      read_blocks<<<8 * sms, 128, 0, t>>>(c.blocks[s], sh.active, size_t(sh.N) * sh.K / 8, sink); return 0; }});
    vars.push_back({"read 264x512", [&c, &sh, sink, sms](int s, cudaStream_t t) {
      read_blocks<<<2 * sms, 512, 0, t>>>(c.blocks[s], sh.active, size_t(sh.N) * sh.K / 8, sink); return 0; }});
    vars.push_back({"8x1 items", grouped(N::GroupedGemv<bf16, 2, 1, 1, false>{}, true)});
    vars.push_back({"16x1 bulk", grouped(N::GroupedGemv<bf16, 4, 1, 1, true>{}, true)});
    vars.push_back({"8x4 items", grouped(N::GroupedGemv<bf16, 2, 4, 1, false>{}, true)});
    vars.push_back({"16x4 bulk", grouped(N::GroupedGemv<bf16, 4, 4, 1, true>{}, true)});
    vars.push_back({"16x1 bulk, active only", grouped(N::GroupedGemv<bf16, 4, 1, 1, true>{}, false)});
    printf("== %s: N=%d K=%d active=%d M=%d, %.1f MB\n", sh.name, sh.N, sh.K, sh.active, sh.M, bytes / 1e6);
    std::vector<uint16_t> ref;
    for (auto& var : vars) {
      const std::string& name = var.first;
      const auto& fn = var.second;
      // correctness vs the first gemv variant (bitwise: same per-row arithmetic)
      if (once) printf("%-22s ...", name.c_str());  // before the launch: a hang shows where
      CK(cudaMemsetAsync(dout, 0xff, size_t(sh.active) * sh.M * sh.N * 2, st));
      int rc = fn(0, st);
      CK(cudaStreamSynchronize(st));
      if (rc) { printf("%-20s rc=%d %s\n", name.c_str(), rc, autotune::g_last_error); continue; }
      std::string check = "";
      if (name.rfind("read", 0) != 0) {
        std::vector<uint16_t> out(size_t(sh.active) * sh.M * sh.N);
        CK(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
        if (ref.empty()) ref = out;
        size_t bad = 0; for (size_t i = 0; i < out.size(); ++i) bad += out[i] != ref[i];
        check = bad ? " MISMATCH " + std::to_string(bad) : " ok";
      }
      if (once) { printf(" once%s\n", check.c_str()); continue; }  // the name is printed
      const float us = graph_us([&fn](int r, cudaStream_t t) { fn(r % Case::kSets, t); }, st);
      printf("%-22s %7.2f us  %5.2f TB/s%s\n", name.c_str(), us, bytes / (us * 1e-6) / 1e12, check.c_str());
    }
  }
  // Dense projections at decode (fc1: router+latent, fp32 out; fc2), weights rotated over 8 copies.
  {
    struct D { const char* name; int M, N, K; };
    for (D dd : {D{"fc1 T=1", 1, 2048, 4096}, D{"fc2 T=1", 1, 4096, 1024}, D{"fc1 T=2", 2, 2048, 4096},
                 D{"fc2 T=2", 2, 4096, 1024}, D{"fc2 T=4", 4, 4096, 1024}}) {
      const int sets = 8;
      std::vector<bf16*> w(sets);
      for (auto& p : w) { CK(cudaMalloc(&p, size_t(dd.N) * dd.K * 2)); fill<<<256, 256>>>(p, size_t(dd.N) * dd.K, 5); }
      bf16* a; CK(cudaMalloc(&a, size_t(dd.M) * dd.K * 2)); fill<<<16, 256>>>(a, size_t(dd.M) * dd.K, 7);
      float* d; CK(cudaMalloc(&d, size_t(dd.M) * dd.N * 4));
      double bytes = double(dd.N) * dd.K * 2;
      using Fn = std::function<int(int, cudaStream_t)>;
      std::vector<std::pair<std::string, Fn>> vars;
      namespace N = autotune::gemv;
      auto dense = [&](auto tag) {
        using K = decltype(tag);
        return Fn([&w, a, d, dd, sms](int s, cudaStream_t t) {
          return K::run_dense(dd.M, dd.N, dd.K, a, w[s % 8], d, nullptr, 0, sms, 0, 1, t); });
      };
      vars.push_back({"8x1", dense(N::GroupedGemv<bf16, 2, 1, 2, false>{})});
      vars.push_back({"16x1", dense(N::GroupedGemv<bf16, 4, 1, 2, true>{})});
      vars.push_back({"8x4", dense(N::GroupedGemv<bf16, 2, 4, 2, false>{})});
      printf("== dense %s: M=%d N=%d K=%d, %.1f MB\n", dd.name, dd.M, dd.N, dd.K, bytes / 1e6);
      std::vector<float> ref;
      for (auto& var : vars) {
        const std::string& name = var.first;
        const auto& fn = var.second;
        CK(cudaMemsetAsync(d, 0xff, size_t(dd.M) * dd.N * 4, st));
        int rc = fn(0, st); CK(cudaStreamSynchronize(st));
        if (rc) { printf("%-22s rc=%d %s\n", name.c_str(), rc, autotune::g_last_error); continue; }
        std::vector<float> out(size_t(dd.M) * dd.N);
        CK(cudaMemcpy(out.data(), d, out.size() * 4, cudaMemcpyDeviceToHost));
        if (ref.empty()) ref = out;
        size_t bad = 0; for (size_t i = 0; i < out.size(); ++i) bad += !(std::fabs(out[i] - ref[i]) <= 1e-3f * (1 + std::fabs(ref[i])));
        const float us = graph_us([&fn](int r, cudaStream_t t) { fn(r, t); }, st);
        printf("%-22s %7.2f us  %5.2f TB/s %s\n", name.c_str(), us, bytes / (us * 1e-6) / 1e12, bad ? "MISMATCH" : "ok");
      }
      for (auto p : w) cudaFree(p);
      cudaFree(a); cudaFree(d);
    }
  }
  // fc2 after the combine at decode (Super: 22 pairs per token, K = 1024, N = 4096): the routing
  // library's combine kernel then the dense gemv, against the gemv's combine launch; y rows
  // and weights rotated over 8 sets. Outputs compared with the two-launch result (tolerance:
  // the combined rows are rounded to bf16 after sums in another order).
  for (int T : {1, 2, 4}) {
    const int K = 1024, N = 4096, top_k = 22, sets = 8, rows = T * top_k;
    std::vector<bf16*> w(sets), y(sets);
    std::vector<float*> wt(sets);
    std::vector<int32_t*> ro(sets);
    std::mt19937 g2(T);
    for (int s = 0; s < sets; ++s) {
      CK(cudaMalloc(&w[s], size_t(N) * K * 2)); fill<<<256, 256>>>(w[s], size_t(N) * K, 5 + s);
      CK(cudaMalloc(&y[s], size_t(rows) * K * 2)); fill<<<64, 256>>>(y[s], size_t(rows) * K, 11 + s);
      std::vector<float> hw(rows); for (auto& v : hw) v = (g2() % 1000) / 1000.f;
      std::vector<int32_t> hr(rows); for (int i = 0; i < rows; ++i) hr[i] = i;
      std::shuffle(hr.begin(), hr.end(), g2);
      CK(cudaMalloc(&wt[s], rows * 4)); CK(cudaMemcpy(wt[s], hw.data(), rows * 4, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&ro[s], rows * 4)); CK(cudaMemcpy(ro[s], hr.data(), rows * 4, cudaMemcpyHostToDevice));
    }
    bf16 *ylat, *d; CK(cudaMalloc(&ylat, size_t(T) * K * 2)); CK(cudaMalloc(&d, size_t(T) * N * 2));
    using Fn = std::function<int(int, cudaStream_t)>;
    std::vector<std::pair<std::string, Fn>> vars;
    namespace G = autotune::gemv;
    namespace R = autotune::routing;
    vars.push_back({"combine + 8x1 dense", [&, T](int s, cudaStream_t t) {
      const int splits = std::max(1, std::min((top_k + 2) / 3, R::kCombineThreads / 128));
      R::combine_split_kernel<bf16><<<T, 128 * splits, sizeof(float) * (splits - 1) * 128 * 8, t>>>(
          y[s % sets], wt[s % sets], ro[s % sets], top_k, K, splits, ylat);
      return G::GroupedGemv<bf16, 2, 1, 0, false>::run_dense(T, N, K, ylat, w[s % sets], d, nullptr, 0, sms, 0, 1, t); }});
    auto fused = [&, T](auto tag) {
      using Kn = decltype(tag);
      return Fn([&, T](int s, cudaStream_t t) {
        return Kn::run_combine_dense(T, N, K, top_k, y[s % sets], wt[s % sets], ro[s % sets], w[s % sets], d, sms, t); });
    };
    vars.push_back({"8x1 combine launch", fused(G::GroupedGemv<bf16, 2, 1, 0, false>{})});
    vars.push_back({"16x1 combine launch", fused(G::GroupedGemv<bf16, 4, 1, 0, true>{})});
    vars.push_back({"8x4 combine launch", fused(G::GroupedGemv<bf16, 2, 4, 0, false>{})});
    printf("== combine + fc2 T=%d: %d pairs, N=%d K=%d\n", T, rows, N, K);
    std::vector<uint16_t> ref;
    for (auto& var : vars) {
      CK(cudaMemsetAsync(d, 0xff, size_t(T) * N * 2, st));
      int rc = var.second(0, st); CK(cudaStreamSynchronize(st));
      if (rc) { printf("%-22s rc=%d %s\n", var.first.c_str(), rc, autotune::g_last_error); continue; }
      std::vector<uint16_t> out(size_t(T) * N);
      CK(cudaMemcpy(out.data(), d, out.size() * 2, cudaMemcpyDeviceToHost));
      if (ref.empty()) ref = out;
      auto f = [](uint16_t h) { uint32_t u = uint32_t(h) << 16; float x; memcpy(&x, &u, 4); return x; };
      double num = 0, den = 0;
      for (size_t i = 0; i < out.size(); ++i) { double e = f(out[i]) - f(ref[i]); num += e * e; den += f(ref[i]) * f(ref[i]); }
      const double rel = std::sqrt(num / den);
      const float us = graph_us([&](int r, cudaStream_t t) { var.second(r, t); }, st);
      printf("%-22s %7.2f us  rel diff %.1e %s\n", var.first.c_str(), us, rel, rel <= 1e-2 ? "ok" : "MISMATCH");
    }
  }
  return 0;
}

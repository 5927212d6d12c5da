// The down GEMM and the combine of the latent MoE at Nemotron 3 Super's sizes, two ways:
//   store: the shipped epilogue writes each (token, pick) row in bf16, the combine kernel reads
//          each token's top_k rows back and sums them with the routing weights (fixed order);
//   scatter: the epilogue adds each row, times its weight, into the token's fp32 row with
//          red.global.add (zeroed first), then one kernel rounds those rows to bf16.
// Uniform random top-22 routing over 512 experts. The two results are compared (relative
// Frobenius difference), then each pipeline is timed as a CUDA graph of five calls, the two
// alternating, median of 20 replays; the GEMMs alone too.
// NOTES.md v17; results in benchmarks/results/scatter_add_probe_h200_v17_2026-11-30.txt.
// Usage (sm90): ./build.sh DIR && DIR/probe T [K N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
typedef int (*RunFn)(int, const int32_t*, const void* const*, const void* const*, void* const*, void*, size_t, int, cudaStream_t, const void*, const int32_t*, const float*, float*, int, long);
#define DECL(n) extern "C" int n##_run(int, const int32_t*, const void* const*, const void* const*, void* const*, void*, size_t, int, cudaStream_t, const void*, const int32_t*, const float*, float*, int, long); extern "C" const char* n##_err();
#include "variants.h"

__global__ void fill(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 32768.0f - 1.0f) * scale);
  }
}
// out[t] = sum_j w[t, j] * y[row_of[t, j]], fp32 in the order j = 0..k-1 (as the shipped combine).
__global__ void combine(const __nv_bfloat16* y, const float* w, const int* row_of, int k, int n, __nv_bfloat16* out) {
  int t = blockIdx.x;
  for (int c = threadIdx.x * 8; c < n; c += blockDim.x * 8) {
    float acc[8] = {0};
    for (int j = 0; j < k; ++j) {
      uint4 raw = *reinterpret_cast<const uint4*>(y + (size_t)row_of[t * k + j] * n + c);
      const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
      float wj = w[t * k + j];
      for (int i = 0; i < 8; ++i) acc[i] += wj * __bfloat162float(v[i]);
    }
    uint4 o; __nv_bfloat16* ov = reinterpret_cast<__nv_bfloat16*>(&o);
    for (int i = 0; i < 8; ++i) ov[i] = __float2bfloat16(acc[i]);
    *reinterpret_cast<uint4*>(out + (size_t)t * n + c) = o;
  }
}
__global__ void to_bf16(const float4* in, __nv_bfloat162* out, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
    float4 v = in[i];
    out[2 * i] = __floats2bfloat162_rn(v.x, v.y); out[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
  }
}
int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 2048;
  int K = argc > 2 ? atoi(argv[2]) : 2688, N = argc > 3 ? atoi(argv[3]) : 1024;
  int E = 512, top = 22, rows = T * top;
  int sm = 0; CK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(1234);
  std::vector<std::vector<int>> per(E);  // pairs of each expert
  for (int t = 0; t < T; ++t) {
    std::vector<int> ex(E); for (int e = 0; e < E; ++e) ex[e] = e;
    for (int j = 0; j < top; ++j) { int s = j + rng() % (E - j); std::swap(ex[j], ex[s]); per[ex[j]].push_back(t * top + j); }
  }
  std::vector<int> pair_of_row, off(E), row_of(rows); std::vector<float> wt(rows);
  for (int e = 0; e < E; ++e) { off[e] = pair_of_row.size(); pair_of_row.insert(pair_of_row.end(), per[e].begin(), per[e].end()); }
  for (int r = 0; r < rows; ++r) row_of[pair_of_row[r]] = r;
  for (int p = 0; p < rows; ++p) wt[p] = 0.02f + (rng() % 1000) / 20000.0f;
  __nv_bfloat16 *h, *w, *y2, *o0, *o1; float* acc; int *dpor, *drow; float* dwt;
  CK(cudaMalloc(&h, (size_t)rows * K * 2)); CK(cudaMalloc(&w, (size_t)E * N * K * 2)); CK(cudaMalloc(&y2, (size_t)rows * N * 2));
  CK(cudaMalloc(&o0, (size_t)T * N * 2)); CK(cudaMalloc(&o1, (size_t)T * N * 2)); CK(cudaMalloc(&acc, (size_t)T * N * 4));
  CK(cudaMalloc(&dpor, rows * 4)); CK(cudaMalloc(&drow, rows * 4)); CK(cudaMalloc(&dwt, rows * 4));
  CK(cudaMemcpy(dpor, pair_of_row.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(drow, row_of.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dwt, wt.data(), rows * 4, cudaMemcpyHostToDevice));
  fill<<<4096, 256>>>(h, (size_t)rows * K, 7, 1.0f); fill<<<4096, 256>>>(w, (size_t)E * N * K, 11, 0.05f);
  std::vector<int32_t> mnk(3 * E); std::vector<const void*> pa(E), pb(E); std::vector<void*> pd(E);
  for (int e = 0; e < E; ++e) {
    mnk[3 * e] = per[e].size(); mnk[3 * e + 1] = N; mnk[3 * e + 2] = K;
    pa[e] = h + (size_t)off[e] * K; pb[e] = w + (size_t)e * N * K; pd[e] = y2 + (size_t)off[e] * N;
  }
  int32_t* dmnk; void **dpa, **dpb, **dpd;
  CK(cudaMalloc(&dmnk, 12 * E)); CK(cudaMalloc(&dpa, 8 * E)); CK(cudaMalloc(&dpb, 8 * E)); CK(cudaMalloc(&dpd, 8 * E));
  CK(cudaMemcpy(dmnk, mnk.data(), 12 * E, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dpa, pa.data(), 8 * E, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpb, pb.data(), 8 * E, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dpd, pd.data(), 8 * E, cudaMemcpyHostToDevice));
  void* ws; size_t wsb = 64 << 20; CK(cudaMalloc(&ws, wsb));
  struct V { const char* name; RunFn run; const char* (*err)(); int scatter; };
  std::vector<V> vs = { VARIANT_LIST };
  cudaStream_t s; CK(cudaStreamCreate(&s));
  size_t n4 = (size_t)T * N / 4;
  // pipeline i (what the layer would run), or the GEMM alone
  auto call = [&](const V& v, bool gemm_only, __nv_bfloat16* out) {
    if (v.scatter && !gemm_only) CK(cudaMemsetAsync(acc, 0, (size_t)T * N * 4, s));
    int rc = v.run(E, dmnk, (const void* const*)dpa, (const void* const*)dpb, (void* const*)dpd, ws, wsb, sm, s, y2, dpor, dwt, acc, top, N);
    if (rc) { printf("%s rc %d %s\n", v.name, rc, v.err()); exit(1); }
    if (gemm_only) return;
    if (v.scatter) to_bf16<<<sm * 8, 256, 0, s>>>((const float4*)acc, (__nv_bfloat162*)out, n4);
    else combine<<<T, 128, 0, s>>>(y2, dwt, drow, top, N, out);
  };
  std::vector<__nv_bfloat16> ref((size_t)T * N), got((size_t)T * N);
  for (size_t i = 0; i < vs.size(); ++i) {
    __nv_bfloat16* out = i == 0 ? o0 : o1;
    CK(cudaMemsetAsync(out, 0xff, (size_t)T * N * 2, s)); CK(cudaMemsetAsync(y2, 0xff, (size_t)rows * N * 2, s));  // poison
    call(vs[i], false, out); CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(i == 0 ? ref.data() : got.data(), out, (size_t)T * N * 2, cudaMemcpyDeviceToHost));
    if (i == 0) continue;
    double num = 0, den = 0; size_t bad = 0;
    for (size_t j = 0; j < ref.size(); ++j) {
      double a = __bfloat162float(ref[j]), b = __bfloat162float(got[j]);
      if (!std::isfinite(b)) ++bad;
      num += (a - b) * (a - b); den += a * a;
    }
    printf("%-24s rel diff vs %s: %.2e (non-finite %zu)\n", vs[i].name, vs[0].name, std::sqrt(num / den), bad);
  }
  std::vector<cudaGraphExec_t> ge;
  for (int gemm_only = 0; gemm_only < 2; ++gemm_only)
    for (size_t i = 0; i < vs.size(); ++i) {
      cudaGraph_t g; CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      for (int j = 0; j < 5; ++j) call(vs[i], gemm_only, o1);
      CK(cudaStreamEndCapture(s, &g)); cudaGraphExec_t x; CK(cudaGraphInstantiate(&x, g, 0)); ge.push_back(x);
    }
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  int R = 20; std::vector<std::vector<float>> t(ge.size());
  for (int r = 0; r < R; ++r)
    for (size_t i = 0; i < ge.size(); ++i) {
      CK(cudaEventRecord(e0, s)); CK(cudaGraphLaunch(ge[i], s)); CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); t[i].push_back(ms / 5);
    }
  printf("T=%d K=%d N=%d rows=%d (us per call: median, p10, p90)\n", T, K, N, rows);
  for (size_t i = 0; i < ge.size(); ++i) {
    std::sort(t[i].begin(), t[i].end());
    const V& v = vs[i % vs.size()];
    printf("%-24s %-34s %8.1f %8.1f %8.1f\n", v.name, i < vs.size() ? (v.scatter ? "zero + GEMM + to bf16" : "GEMM + combine") : "GEMM alone",
           1000 * t[i][R / 2], 1000 * t[i][R / 10], 1000 * t[i][R * 9 / 10]);
  }
  return 0;
}

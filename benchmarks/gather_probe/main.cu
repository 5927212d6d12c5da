// The up GEMM of the latent MoE at Nemotron 3 Super's sizes, its A operand (the routed tokens'
// latent rows) read three ways: from the copy sorted by expert that the routing writes (the
// shipped path), gathered by cp.async from the tokens' rows, gathered by one TMA box per row.
// Uniform random top-22 routing over 512 experts; each variant's output is compared bit for bit
// with the first's, then timed as a CUDA graph of five calls (median of 20 replays), with the
// sorted copy's own kernel timed beside. Usage (sm90): ./build.sh DIR && DIR/probe T [K N raster swizzle]
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <random>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
typedef int (*RunFn)(int, const int32_t*, const void* const*, const void* const*, void* const*, void*, size_t, int, int, int, cudaStream_t, const void*, long, long);
#define DECL(n) extern "C" int n##_run(int, const int32_t*, const void* const*, const void* const*, void* const*, void*, size_t, int, int, int, cudaStream_t, const void*, long, long); extern "C" const char* n##_err();
#include "variants.h"

__global__ void fill(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 32768.0f - 1.0f) * scale);
  }
}
__global__ void gather_rows(const __nv_bfloat16* x, const int* tok, __nv_bfloat16* a1, int rows, int k) {
  int r = blockIdx.x; if (r >= rows) return;
  const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)tok[r] * k);
  uint4* dst = reinterpret_cast<uint4*>(a1 + (size_t)r * k);
  for (int c = threadIdx.x; c < k / 8; c += blockDim.x) dst[c] = src[c];
}
__global__ void row_pointers(const __nv_bfloat16* x, const int* tok, const void** rp, int rows, int k) {
  int r = blockIdx.x * blockDim.x + threadIdx.x; if (r < rows) rp[r] = x + (size_t)tok[r] * k;
}
__global__ void mismatch(const uint16_t* a, const uint16_t* b, size_t n, unsigned long long* bad) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    if (a[i] != b[i]) atomicAdd(bad, 1ull);
}
int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 2048;
  int K = argc > 2 ? atoi(argv[2]) : 1024, N = argc > 3 ? atoi(argv[3]) : 2688;
  int E = 512, top = 22, rows = T * top;
  int dev = 0, sm = 0; CK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
  std::mt19937 rng(1234);
  std::vector<std::vector<int>> per(E);
  for (int t = 0; t < T; ++t) {
    std::vector<int> ex(E); for (int e = 0; e < E; ++e) ex[e] = e;
    for (int j = 0; j < top; ++j) { int s = j + rng() % (E - j); std::swap(ex[j], ex[s]); per[ex[j]].push_back(t); }
  }
  std::vector<int> tok; std::vector<int> off(E);
  for (int e = 0; e < E; ++e) { off[e] = tok.size(); tok.insert(tok.end(), per[e].begin(), per[e].end()); }
  __nv_bfloat16 *x, *w, *a1, *h0, *h1; int* dtok; const void** rp;
  CK(cudaMalloc(&x, (size_t)T * K * 2)); CK(cudaMalloc(&w, (size_t)E * N * K * 2));
  CK(cudaMalloc(&a1, (size_t)rows * K * 2)); CK(cudaMalloc(&h0, (size_t)rows * N * 2)); CK(cudaMalloc(&h1, (size_t)rows * N * 2));
  CK(cudaMalloc(&dtok, rows * 4)); CK(cudaMalloc(&rp, rows * 8));
  CK(cudaMemcpy(dtok, tok.data(), rows * 4, cudaMemcpyHostToDevice));
  fill<<<1024, 256>>>(x, (size_t)T * K, 7, 1.0f); fill<<<4096, 256>>>(w, (size_t)E * N * K, 11, 0.05f);
  gather_rows<<<rows, 128>>>(x, dtok, a1, rows, K); row_pointers<<<(rows + 255) / 256, 256>>>(x, dtok, rp, rows, K);
  std::vector<int32_t> mnk(3 * E); std::vector<const void*> pa0(E), pa1(E), pa2(E), pb(E); std::vector<void*> pd0(E), pd1(E);
  for (int e = 0; e < E; ++e) {
    mnk[3 * e] = per[e].size(); mnk[3 * e + 1] = N; mnk[3 * e + 2] = K;
    pa0[e] = a1 + (size_t)off[e] * K; pa1[e] = rp + off[e]; pa2[e] = dtok + off[e]; pb[e] = w + (size_t)e * N * K;
    pd0[e] = h0 + (size_t)off[e] * N; pd1[e] = h1 + (size_t)off[e] * N;
  }
  int32_t* dmnk; void **dpa0, **dpa1, **dpa2, **dpb, **dpd0, **dpd1;
  CK(cudaMalloc(&dmnk, 12 * E)); for (void*** p : {&dpa0, &dpa1, &dpa2, &dpb, &dpd0, &dpd1}) CK(cudaMalloc(p, 8 * E));
  CK(cudaMemcpy(dmnk, mnk.data(), 12 * E, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpa0, pa0.data(), 8 * E, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dpa1, pa1.data(), 8 * E, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dpa2, pa2.data(), 8 * E, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpb, pb.data(), 8 * E, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpd0, pd0.data(), 8 * E, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dpd1, pd1.data(), 8 * E, cudaMemcpyHostToDevice));
  void* ws; size_t wsb = 64 << 20; CK(cudaMalloc(&ws, wsb));
  unsigned long long* bad; CK(cudaMalloc(&bad, 8));
  struct V { const char* name; RunFn run; const char* (*err)(); int kind; };
  std::vector<V> vs = { VARIANT_LIST };
  cudaStream_t s; CK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  int raster = argc > 4 ? atoi(argv[4]) : 0, swz = argc > 5 ? atoi(argv[5]) : 1;
  // correctness: each variant vs the first (plain), bitwise
  for (size_t i = 0; i < vs.size(); ++i) {
    __nv_bfloat16* out = i == 0 ? h0 : h1;
    CK(cudaMemset(out, 0xff, (size_t)rows * N * 2));  // poison (NaN)
    int rc = vs[i].run(E, dmnk, (const void* const*)(vs[i].kind == 2 ? dpa2 : vs[i].kind == 1 ? dpa1 : dpa0), (const void* const*)dpb,
                       (void* const*)(i == 0 ? dpd0 : dpd1), ws, wsb, sm, raster, swz, s, x, (long)T, (long)K);
    if (rc) { printf("%s rc %d %s\n", vs[i].name, rc, vs[i].err()); return 1; }
    CK(cudaStreamSynchronize(s));
    if (i > 0) {
      CK(cudaMemset(bad, 0, 8));
      mismatch<<<1024, 256, 0, s>>>((const uint16_t*)h0, (const uint16_t*)h1, (size_t)rows * N, bad);
      unsigned long long nb; CK(cudaMemcpy(&nb, bad, 8, cudaMemcpyDeviceToHost));
      printf("%-28s mismatches vs %s: %llu of %zu\n", vs[i].name, vs[0].name, nb, (size_t)rows * N);
    }
  }
  // timing: each variant captured in a CUDA graph (5 calls), variants alternating, 20 rounds
  std::vector<cudaGraphExec_t> ge(vs.size() + 1);
  for (size_t i = 0; i <= vs.size(); ++i) {
    cudaGraph_t g; CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int j = 0; j < 5; ++j) {
      if (i == vs.size()) gather_rows<<<rows, 128, 0, s>>>(x, dtok, a1, rows, K);
      else vs[i].run(E, dmnk, (const void* const*)(vs[i].kind == 2 ? dpa2 : vs[i].kind == 1 ? dpa1 : dpa0), (const void* const*)dpb,
                     (void* const*)(i == 0 ? dpd0 : dpd1), ws, wsb, sm, raster, swz, s, x, (long)T, (long)K);
    }
    CK(cudaStreamEndCapture(s, &g)); CK(cudaGraphInstantiate(&ge[i], g, 0));
  }
  int R = 20; std::vector<std::vector<float>> t(vs.size() + 1);
  for (int r = 0; r < R; ++r) {
    for (size_t i = 0; i <= vs.size(); ++i) {
      CK(cudaEventRecord(e0, s)); CK(cudaGraphLaunch(ge[i], s));
      CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); t[i].push_back(ms / 5);
    }
  }
  printf("T=%d K=%d N=%d rows=%d raster=%d swizzle=%d\n", T, K, N, rows, raster, swz);
  for (size_t i = 0; i <= vs.size(); ++i) {
    std::sort(t[i].begin(), t[i].end());
    printf("%-28s median %.1f us  p10 %.1f  p90 %.1f\n", i == vs.size() ? "gather copy (a1 write)" : vs[i].name,
           1000 * t[i][R / 2], 1000 * t[i][R / 10], 1000 * t[i][R * 9 / 10]);
  }
  return 0;
}

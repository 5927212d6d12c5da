// The many-token combine alone (NOTES.md v17): out[t] = sum_j w[t, j] * y[row_of(t, j)] as the
// library's combine_kernel ran it before v17 (one pair's row in flight per thread) and with a
// thread's loads batched 4, 8 or 11 pairs at a time before the sums (the same fixed order, so
// bitwise equal: checked). Uniform random rows, one block per token; each kernel timed after a
// 512 MB memset (cold L2), median of 30.
//
// Usage (on an sm90 GPU):
//   nvcc -arch=sm_90a -std=c++17 -O3 -o /tmp/combine_rates benchmarks/combine_rates.cu
//   /tmp/combine_rates T [width]
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)
typedef __nv_bfloat16 E;
__device__ inline void store8(E* p, const float (&v)[8]) {
  __nv_bfloat162 o[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]), __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(o);
}
__global__ void combine0(const E* __restrict__ y, const float* __restrict__ weights, const int* __restrict__ row_of, int top_k, int width, E* __restrict__ out) {
  int t = blockIdx.x;
  for (int c = threadIdx.x * 8; c < width; c += blockDim.x * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < top_k; ++j) {
      float w = weights[t * top_k + j];
      uint4 raw = *reinterpret_cast<const uint4*>(y + int64_t(row_of[t * top_k + j]) * width + c);
      const E* v = reinterpret_cast<const E*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w * static_cast<float>(v[i]);
    }
    store8(out + int64_t(t) * width + c, acc);
  }
}
template <int B>
__global__ void combineB(const E* __restrict__ y, const float* __restrict__ weights, const int* __restrict__ row_of, int top_k, int width, E* __restrict__ out) {
  int t = blockIdx.x;
  for (int c = threadIdx.x * 8; c < width; c += blockDim.x * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; j0 < top_k; j0 += B) {
      uint4 raw[B]; float w[B];
#pragma unroll
      for (int u = 0; u < B; ++u) {
        int j = j0 + u;
        if (j < top_k) {
          w[u] = weights[t * top_k + j];
          raw[u] = *reinterpret_cast<const uint4*>(y + int64_t(row_of[t * top_k + j]) * width + c);
        }
      }
#pragma unroll
      for (int u = 0; u < B; ++u) {
        if (j0 + u < top_k) {
          const E* v = reinterpret_cast<const E*>(&raw[u]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += w[u] * static_cast<float>(v[i]);
        }
      }
    }
    store8(out + int64_t(t) * width + c, acc);
  }
}
int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 2048, K = 22, W = argc > 2 ? atoi(argv[2]) : 1024;
  int pairs = T * K;
  std::mt19937 rng(1);
  std::vector<int> row_of(pairs); std::iota(row_of.begin(), row_of.end(), 0); std::shuffle(row_of.begin(), row_of.end(), rng);
  std::vector<float> w(pairs); for (auto& x : w) x = (rng() % 1000) / 1000.f;
  std::vector<E> hy((size_t)pairs * W); for (size_t i = 0; i < hy.size(); ++i) hy[i] = __float2bfloat16(((i * 2654435761u) % 2000) / 1000.f - 1.f);
  int* drow; float* dw; E *y, *o0, *o1;
  CK(cudaMalloc(&drow, pairs * 4)); CK(cudaMemcpy(drow, row_of.data(), pairs * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dw, pairs * 4)); CK(cudaMemcpy(dw, w.data(), pairs * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&y, hy.size() * 2)); CK(cudaMemcpy(y, hy.data(), hy.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&o0, (size_t)T * W * 2)); CK(cudaMalloc(&o1, (size_t)T * W * 2));
  size_t fb = (size_t)512 << 20; void* flush; CK(cudaMalloc(&flush, fb));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  int cols = W / 8 < 128 ? (W / 8 + 31) / 32 * 32 : 128;
  auto timed = [&](auto f) {
    std::vector<float> v;
    for (int i = 0; i < 30; ++i) {
      CK(cudaMemsetAsync(flush, 1, fb));
      CK(cudaEventRecord(a)); f(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
      float ms; CK(cudaEventElapsedTime(&ms, a, b)); v.push_back(ms * 1000);
    }
    std::sort(v.begin(), v.end()); return v[15];
  };
  std::vector<E> r0((size_t)T * W), r1((size_t)T * W);
  combine0<<<T, cols>>>(y, dw, drow, K, W, o0); CK(cudaMemcpy(r0.data(), o0, r0.size() * 2, cudaMemcpyDeviceToHost));
  auto same = [&](auto launch) { CK(cudaMemset(o1, 0xff, r1.size() * 2)); launch(); CK(cudaMemcpy(r1.data(), o1, r1.size() * 2, cudaMemcpyDeviceToHost));
    return memcmp(r0.data(), r1.data(), r0.size() * 2) == 0; };
  printf("T=%d width=%d: combine0 %.1f us | batch4 %.1f us (bitwise %d) | batch8 %.1f us (bitwise %d) | batch11 %.1f us (bitwise %d)\n", T, W,
         timed([&] { combine0<<<T, cols>>>(y, dw, drow, K, W, o0); }),
         timed([&] { combineB<4><<<T, cols>>>(y, dw, drow, K, W, o1); }), same([&] { combineB<4><<<T, cols>>>(y, dw, drow, K, W, o1); }),
         timed([&] { combineB<8><<<T, cols>>>(y, dw, drow, K, W, o1); }), same([&] { combineB<8><<<T, cols>>>(y, dw, drow, K, W, o1); }),
         timed([&] { combineB<11><<<T, cols>>>(y, dw, drow, K, W, o1); }), same([&] { combineB<11><<<T, cols>>>(y, dw, drow, K, W, o1); }));
  return 0;
}

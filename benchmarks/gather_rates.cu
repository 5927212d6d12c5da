// The many-token gather's memory traffic alone (NOTES.md v17): how fast 16-byte stores fill the
// sorted rows (the write ceiling), and the gather (each pair's fp32 row, 4 KB, read from an
// L2-warm source and written as its bf16 sorted row) four ways: as the library's gather_pair
// loops (one 8-column chunk's load then its store), a lane's four loads issued before its
// stores, from a bf16 source, and with streaming (evict-first) stores. Uniform random rows;
// each kernel timed after a 512 MB memset (cold L2, the source re-read warm), median of 30.
//
// Usage (on an sm90 GPU):
//   nvcc -arch=sm_90a -std=c++17 -O3 -o /tmp/gather_rates benchmarks/gather_rates.cu
//   /tmp/gather_rates T
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

__global__ void fill16(uint4* p, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = make_uint4(i, i + 1, i + 2, i + 3);
}
__global__ void touch(const float4* p, size_t n, float* sink) {
  float s = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) s += p[i].x;
  if (s == 12345.f) *sink = s;
}
__device__ inline void cvt8(const float* s, __nv_bfloat16* d) {
  float4 a = reinterpret_cast<const float4*>(s)[0], b = reinterpret_cast<const float4*>(s)[1];
  __nv_bfloat162 o[4] = {__floats2bfloat162_rn(a.x, a.y), __floats2bfloat162_rn(a.z, a.w),
                         __floats2bfloat162_rn(b.x, b.y), __floats2bfloat162_rn(b.z, b.w)};
  *reinterpret_cast<uint4*>(d) = *reinterpret_cast<uint4*>(o);
}
// Mode 0: as shipped (warp per pair, runtime-width loop). 1: the row's loads all issued first.
// 2: bf16 source. 3: mode 1 with streaming (evict-first) stores.
template <int Mode>
__global__ void __launch_bounds__(256) gather(const void* src, long ld, int top_k, int width, const int* row_of,
                                              int pairs, __nv_bfloat16* dst) {
  int lane = threadIdx.x % 32;
  for (int p = blockIdx.x * 8 + threadIdx.x / 32; p < pairs; p += gridDim.x * 8) {
    int row = row_of[p];
    __nv_bfloat16* d = dst + (size_t)row * width;
    if (Mode == 0) {
      const float* s = (const float*)src + (size_t)(p / top_k) * ld;
      for (int c = lane * 8; c < width; c += 256) cvt8(s + c, d + c);
    } else if (Mode == 2) {
      const __nv_bfloat16* s = (const __nv_bfloat16*)src + (size_t)(p / top_k) * ld;
      uint4 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = *reinterpret_cast<const uint4*>(s + lane * 8 + 256 * i);
#pragma unroll
      for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(d + lane * 8 + 256 * i) = v[i];
    } else {
      const float* s = (const float*)src + (size_t)(p / top_k) * ld;
      float4 v[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = reinterpret_cast<const float4*>(s + lane * 8 + 256 * i)[0];
        v[2 * i + 1] = reinterpret_cast<const float4*>(s + lane * 8 + 256 * i)[1];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 o[4] = {__floats2bfloat162_rn(v[2*i].x, v[2*i].y), __floats2bfloat162_rn(v[2*i].z, v[2*i].w),
                               __floats2bfloat162_rn(v[2*i+1].x, v[2*i+1].y), __floats2bfloat162_rn(v[2*i+1].z, v[2*i+1].w)};
        uint4 u = *reinterpret_cast<uint4*>(o);
        uint4* q = reinterpret_cast<uint4*>(d + lane * 8 + 256 * i);
        if (Mode == 3) __stcs(q, u); else *q = u;
      }
    }
  }
}
int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 2048, K = 22, W = 1024;
  long ld = 2048 + 8;
  int pairs = T * K;
  std::mt19937 rng(1);
  std::vector<int> row_of(pairs);
  std::iota(row_of.begin(), row_of.end(), 0);
  std::shuffle(row_of.begin(), row_of.end(), rng);  // rows scattered as the sorted order makes them
  int* drow; float* src; __nv_bfloat16 *srcb, *dst; float* sink;
  CK(cudaMalloc(&drow, pairs * 4)); CK(cudaMemcpy(drow, row_of.data(), pairs * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&src, (size_t)T * ld * 4)); CK(cudaMalloc(&srcb, (size_t)T * ld * 2));
  CK(cudaMalloc(&dst, (size_t)pairs * W * 2)); CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(src, 0, (size_t)T * ld * 4)); CK(cudaMemset(srcb, 0, (size_t)T * ld * 2));
  size_t fb = (size_t)512 << 20; void* flush; CK(cudaMalloc(&flush, fb));
  int sm; CK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  auto timed = [&](auto f, auto pre) {
    std::vector<float> v;
    for (int i = 0; i < 30; ++i) {
      CK(cudaMemsetAsync(flush, 1, fb)); pre();
      CK(cudaEventRecord(a)); f(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
      float ms; CK(cudaEventElapsedTime(&ms, a, b)); v.push_back(ms * 1000);
    }
    std::sort(v.begin(), v.end()); return v[15];
  };
  auto none = [] {};
  auto warm32 = [&] { touch<<<sm * 4, 256>>>((const float4*)src, (size_t)T * ld / 4, sink); };
  auto warm16 = [&] { touch<<<sm * 4, 256>>>((const float4*)srcb, (size_t)T * ld / 8, sink); };
  size_t n16 = (size_t)pairs * W * 2 / 16;
  printf("T=%d: %zu MB written\n", T, n16 * 16 >> 20);
  for (int bpsm : {4, 8, 16}) printf("fill16 %d blocks/SM: %.1f us\n", bpsm, timed([&] { fill16<<<sm * bpsm, 256>>>((uint4*)dst, n16); }, none));
  for (int bpsm : {6, 8}) {
    printf("gather %d blocks/SM: shipped-style %.1f | loads first %.1f | bf16 src %.1f | loads first + st.cs %.1f us\n", bpsm,
      timed([&] { gather<0><<<sm * bpsm, 256>>>(src, ld, K, W, drow, pairs, dst); }, warm32),
      timed([&] { gather<1><<<sm * bpsm, 256>>>(src, ld, K, W, drow, pairs, dst); }, warm32),
      timed([&] { gather<2><<<sm * bpsm, 256>>>(srcb, ld, K, W, drow, pairs, dst); }, warm16),
      timed([&] { gather<3><<<sm * bpsm, 256>>>(src, ld, K, W, drow, pairs, dst); }, warm32));
  }
  return 0;
}

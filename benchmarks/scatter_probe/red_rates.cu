// The combine's memory traffic alone, at one token count (NOTES v17), each kernel timed with a
// cold L2 (a 512 MB memset before each run), median of 25:
//   store    each sorted row's bf16 values written once from wgmma's register layout (the
//            shipped epilogue writes the same bytes through shared memory and the TMA);
//   combine  today's combine: each token's top_k rows of y2 read back and summed in fp32;
//   red_*    the alternative: each sorted row's fp32 values added into its token's row of an
//            fp32 buffer with red.global.add (scalar, .v2 as wgmma's accumulator layout gives
//            a thread two neighbouring columns, .v4 after a shuffle through shared memory);
//   convert  that buffer to bf16 (fc2's input).
// Rows per expert and the pairs' order come from a uniform random top-k, sorted by expert.
// Usage (sm90): nvcc -O3 -std=c++17 -arch=sm_90a -o red_rates red_rates.cu
//               ./red_rates T [top_k experts width]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>
#include <cmath>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); std::exit(1); } } while (0)

__device__ inline float value(int r, int c) { return float((r * 131 + c * 7) & 255) * (1.0f / 256); }

// A CTA covers 128 rows x 256 columns as a cooperative 128x256 tile's two consumer
// warpgroups would: thread (warp w, lane l) holds rows w*16 + l/4 + {0, 8}, columns
// (l%4)*2 + 8*j + {0, 1}.
constexpr int kTileM = 128, kTileN = 256;

__global__ void __launch_bounds__(256) store_kernel(__nv_bfloat16* y, int rows, int width) {
  int r0 = blockIdx.x * kTileM, c0 = blockIdx.y * kTileN;
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  for (int h = 0; h < 2; ++h) {
    int r = r0 + w * 16 + l / 4 + 8 * h;
    if (r >= rows) continue;
    for (int j = 0; j < kTileN / 8; ++j) {
      int c = c0 + (l % 4) * 2 + 8 * j;
      __nv_bfloat162 v = __floats2bfloat162_rn(value(r, c), value(r, c + 1));
      *reinterpret_cast<__nv_bfloat162*>(y + int64_t(r) * width + c) = v;
    }
  }
}

template <int kVec>
__global__ void __launch_bounds__(256) red_kernel(float* out, const int* token_of_row,
                                                  const float* weight_of_row, int rows, int width) {
  int r0 = blockIdx.x * kTileM, c0 = blockIdx.y * kTileN;
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (kVec <= 2) {
    for (int h = 0; h < 2; ++h) {
      int r = r0 + w * 16 + l / 4 + 8 * h;
      if (r >= rows) continue;
      float s = weight_of_row[r];
      float* dst = out + int64_t(token_of_row[r]) * width;
      for (int j = 0; j < kTileN / 8; ++j) {
        int c = c0 + (l % 4) * 2 + 8 * j;
        float a = s * value(r, c), b = s * value(r, c + 1);
        if (kVec == 2) {
          asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst + c), "f"(a), "f"(b)
                       : "memory");
        } else {
          atomicAdd(dst + c, a);
          atomicAdd(dst + c + 1, b);
        }
      }
    }
  } else {
    // After a shuffle through shared memory: a warp covers one row's 128 contiguous columns.
    for (int i = w; i < kTileM * (kTileN / 128); i += 8) {
      int r = r0 + i / (kTileN / 128);
      if (r >= rows) continue;
      int c = c0 + (i % (kTileN / 128)) * 128 + l * 4;
      float s = weight_of_row[r];
      float* dst = out + int64_t(token_of_row[r]) * width + c;
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst),
                   "f"(s * value(r, c)), "f"(s * value(r, c + 1)), "f"(s * value(r, c + 2)),
                   "f"(s * value(r, c + 3))
                   : "memory");
    }
  }
}

__global__ void combine_kernel(const __nv_bfloat16* y, const float* weights, const int* row_of,
                               int top_k, int width, __nv_bfloat16* out) {
  int t = blockIdx.x;
  for (int c = threadIdx.x * 8; c < width; c += blockDim.x * 8) {
    float acc[8] = {0};
    for (int j = 0; j < top_k; ++j) {
      uint4 raw = *reinterpret_cast<const uint4*>(y + int64_t(row_of[t * top_k + j]) * width + c);
      const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
      float wj = weights[t * top_k + j];
      for (int i = 0; i < 8; ++i) acc[i] += wj * __bfloat162float(v[i]);
    }
    uint4 o;
    __nv_bfloat16* ov = reinterpret_cast<__nv_bfloat16*>(&o);
    for (int i = 0; i < 8; ++i) ov[i] = __float2bfloat16(acc[i]);
    *reinterpret_cast<uint4*>(out + int64_t(t) * width + c) = o;
  }
}

__global__ void convert_kernel(const float4* in, __nv_bfloat162* out, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    float4 v = in[i];
    out[2 * i] = __floats2bfloat162_rn(v.x, v.y);
    out[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

int main(int argc, char** argv) {
  int T = argc > 1 ? std::atoi(argv[1]) : 2048;
  int K = argc > 2 ? std::atoi(argv[2]) : 22;
  int E = argc > 3 ? std::atoi(argv[3]) : 512;
  int W = argc > 4 ? std::atoi(argv[4]) : 1024;
  int rows = T * K;
  std::mt19937 rng(1234);
  std::vector<int> ids(rows);
  std::vector<int> perm(E);
  for (int t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    for (int j = 0; j < K; ++j) {
      std::swap(perm[j], perm[j + rng() % (E - j)]);
      ids[t * K + j] = perm[j];
    }
  }
  std::vector<int> pairs(rows);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(), [&](int a, int b) { return ids[a] < ids[b]; });
  std::vector<int> token_of_row(rows), row_of(rows);
  std::vector<float> weight(rows), weight_of_row(rows);
  for (int p = 0; p < rows; ++p) weight[p] = 0.01f + float(rng() % 1000) / 1000.0f;
  for (int r = 0; r < rows; ++r) {
    token_of_row[r] = pairs[r] / K;
    weight_of_row[r] = weight[pairs[r]];
    row_of[pairs[r]] = r;
  }
  int *d_tor, *d_row_of;
  float *d_wor, *d_w, *d_acc;
  __nv_bfloat16 *d_y, *d_out;
  CK(cudaMalloc(&d_tor, rows * 4));
  CK(cudaMalloc(&d_row_of, rows * 4));
  CK(cudaMalloc(&d_wor, rows * 4));
  CK(cudaMalloc(&d_w, rows * 4));
  CK(cudaMalloc(&d_acc, int64_t(T) * W * 4));
  CK(cudaMalloc(&d_y, int64_t(rows) * W * 2));
  CK(cudaMalloc(&d_out, int64_t(T) * W * 2));
  CK(cudaMemcpy(d_tor, token_of_row.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_row_of, row_of.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_wor, weight_of_row.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_w, weight.data(), rows * 4, cudaMemcpyHostToDevice));
  // A 512 MB buffer read between runs, so the store and combine see a cold L2 as in the layer.
  size_t flush_bytes = size_t(512) << 20;
  void* flush;
  CK(cudaMalloc(&flush, flush_bytes));
  auto cold = [&] { CK(cudaMemsetAsync(flush, 1, flush_bytes)); };
  dim3 grid((rows + kTileM - 1) / kTileM, W / kTileN);
  int64_t n4 = int64_t(T) * W / 4;

  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  auto timed = [&](auto f) {
    std::vector<float> v;
    for (int i = 0; i < 25; ++i) {
      cold();
      CK(cudaEventRecord(a));
      f();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      v.push_back(ms * 1000);
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  float t_store = timed([&] { store_kernel<<<grid, 256>>>(d_y, rows, W); });
  float t_combine = timed([&] { combine_kernel<<<T, 128>>>(d_y, d_w, d_row_of, K, W, d_out); });
  float t_zero = timed([&] { CK(cudaMemsetAsync(d_acc, 0, int64_t(T) * W * 4)); });
  float t_red1 = timed([&] { red_kernel<1><<<grid, 256>>>(d_acc, d_tor, d_wor, rows, W); });
  float t_red2 = timed([&] { red_kernel<2><<<grid, 256>>>(d_acc, d_tor, d_wor, rows, W); });
  float t_red4 = timed([&] { red_kernel<4><<<grid, 256>>>(d_acc, d_tor, d_wor, rows, W); });
  float t_conv = timed([&] { convert_kernel<<<132 * 8, 256>>>(
                           reinterpret_cast<float4*>(d_acc), reinterpret_cast<__nv_bfloat162*>(d_out), n4); });
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  // Check: red_v2 once into zeros equals the combine of the stored rows (to bf16 rounding).
  CK(cudaMemset(d_acc, 0, int64_t(T) * W * 4));
  red_kernel<2><<<grid, 256>>>(d_acc, d_tor, d_wor, rows, W);
  store_kernel<<<grid, 256>>>(d_y, rows, W);
  combine_kernel<<<T, 128>>>(d_y, d_w, d_row_of, K, W, d_out);
  std::vector<float> acc(int64_t(T) * W);
  std::vector<__nv_bfloat16> out(int64_t(T) * W);
  CK(cudaMemcpy(acc.data(), d_acc, acc.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t i = 0; i < acc.size(); ++i) {
    double d = acc[i] - double(__bfloat162float(out[i]));
    num += d * d;
    den += double(acc[i]) * acc[i];
  }
  std::printf("T=%d top_k=%d experts=%d width=%d rows=%d (us, median of 25, cold L2)\n", T, K, E,
              W, rows);
  std::printf("store %.1f  combine %.1f  | zero %.1f  red_scalar %.1f  red_v2 %.1f  red_v4 %.1f  "
              "convert %.1f  | rel diff red vs combine %.2e\n",
              t_store, t_combine, t_zero, t_red1, t_red2, t_red4, t_conv, std::sqrt(num / den));
  return 0;
}

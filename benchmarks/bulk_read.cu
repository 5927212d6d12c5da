// How fast the bulk-copy engine (cp.async.bulk into shared memory, as the gemv's bulk schedule
// uses it) streams the Super preset's 22 active up-projection blocks (121 MB) from DRAM, by copy
// size, stages in flight and CTAs per SM. The consumers only wait for each stage and release it:
// this is the ceiling of the bulk schedule, beside the register-fed read of gemv_schedules.cu.
//
// Usage (on an sm90 GPU; CUTLASS headers for epilogues.cuh):
//   nvcc -arch=sm_90a -std=c++17 -O3 -Itemplates -Ibenchmarks -I<cutlass>/include \
//        -o /tmp/bulk_read benchmarks/bulk_read.cu && /tmp/bulk_read
#include <random>
#include <vector>

#include "gemv.cuh"
#include "graph_timing.cuh"

using namespace autotune::gemv;

// Warp 1's lane 0 copies chunks [begin, end) of the blocks in S-byte copies into an NS-stage
// ring; warp 0 waits for each and hands it back.
template <int S, int NS>
__global__ void __launch_bounds__(64) bulk_read(const char* const* blocks, size_t block_bytes,
                                                int nblocks, unsigned* sink) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ uint64_t full[NS], empty[NS];
  if (threadIdx.x == 0) {
    for (int s = 0; s < NS; ++s) bar_init(&full[s], 1), bar_init(&empty[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const size_t per_block = block_bytes / S;
  const int total = static_cast<int>(per_block * nblocks);
  const int begin = static_cast<int>(int64_t(total) * blockIdx.x / gridDim.x);
  const int end = static_cast<int>(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 1) {
    if (lane != 0) return;
    for (int c = begin, i = 0; c < end; ++c, ++i) {
      bar_wait(&empty[i % NS], ((i / NS) & 1) ^ 1);
      bulk_load(ring + (i % NS) * S, blocks[c / per_block] + (c % per_block) * S, S,
                &full[i % NS]);
    }
    return;
  }
  unsigned acc = 0;
  for (int c = begin, i = 0; c < end; ++c, ++i) {
    bar_wait(&full[i % NS], (i / NS) & 1);
    acc ^= reinterpret_cast<const unsigned*>(ring + (i % NS) * S)[lane];
    __syncwarp();
    if (lane == 0) bar_arrive(&empty[i % NS]);
  }
  if (acc == 0x12345u) sink[0] = acc;  // keeps the reads
}

int main() {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  const int experts = 512, active = 22;
  const size_t block_bytes = size_t(2688) * 1024 * 2;
  char* w;
  CK(cudaMalloc(&w, experts * block_bytes));
  CK(cudaMemset(w, 1, experts * block_bytes));
  // Four expert sets rotate through the timed calls, so the weights come from DRAM.
  std::mt19937 rng(1);
  const char** sets[4];
  for (auto& set : sets) {
    std::vector<int> perm(experts);
    for (int i = 0; i < experts; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<const char*> p(active);
    for (int i = 0; i < active; ++i) p[i] = w + perm[i] * block_bytes;
    CK(cudaMalloc(&set, active * sizeof(char*)));
    CK(cudaMemcpy(set, p.data(), active * sizeof(char*), cudaMemcpyHostToDevice));
  }
  auto run = [&](auto kernel, int S, int NS, int per_sm) {
    const size_t smem = size_t(S) * NS;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    const float us = graph_us(
        [&](int r, cudaStream_t t) {
          kernel<<<per_sm * sms, 64, smem, t>>>(sets[r % 4], block_bytes, active, sink);
        },
        st);
    printf("copy %6d B x %2d stages, %d CTA/SM  %7.2f us  %5.2f TB/s\n", S, NS, per_sm, us,
           active * block_bytes / (us * 1e-6) / 1e12);
  };
  run(bulk_read<32768, 6>, 32768, 6, 1);
  run(bulk_read<32768, 4>, 32768, 4, 1);
  run(bulk_read<16384, 12>, 16384, 12, 1);
  run(bulk_read<8192, 24>, 8192, 24, 1);
  run(bulk_read<4096, 48>, 4096, 48, 1);
  run(bulk_read<2048, 96>, 2048, 96, 1);
  run(bulk_read<16384, 6>, 16384, 6, 2);
  run(bulk_read<4096, 24>, 4096, 24, 2);
  run(bulk_read<4096, 6>, 4096, 6, 8);
  return 0;
}

// Where the bulk gemv schedule's time goes at one token (templates/gemv.cuh): a copy of
// grouped_bulk_kernel with %globaltimer stamps per CTA (entry, shape scan done, first and last
// copy issued, first stage consumed, last consumer done), and variants that take the shape scan
// out (item offsets given) or the FMAs out (consumers only wait and release). The variants'
// graph-replay times are the measurement; read the stamps to about a microsecond only (on the
// H200 their medians fell on steps of ~1.1 us, as if %globaltimer ticked that often; clock64
// per CTA would be finer). Keep the copy in step with Bulk::run.
//
// Usage (on an sm90 GPU; CUTLASS headers for epilogues.cuh):
//   nvcc -arch=sm_90a -std=c++17 -O3 -Itemplates -Ibenchmarks -I<cutlass>/include \
//        -o /tmp/bulk_phases benchmarks/bulk_phases.cu && /tmp/bulk_phases
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "gemv.cuh"
#include "graph_timing.cuh"

using namespace autotune::gemv;
using bf16 = __nv_bfloat16;

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

constexpr int kStamps = 6;

template <class B, bool kScan, bool kFma>
__global__ void __launch_bounds__(kBulkThreads, 1)
stamped(int groups, const int32_t* __restrict__ mnk, const void* const* __restrict__ ptr_a,
        const void* const* __restrict__ ptr_b, void* const* __restrict__ ptr_d,
        const int* given_first, int given_total, unsigned long long* stamps) {
  using Element = typename B::Element;
  using ElementD = typename B::ElementD;
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  __shared__ unsigned long long done;
  unsigned long long* st = stamps + blockIdx.x * kStamps;
  if (threadIdx.x == 0) st[0] = now(), done = 0;
  int* first = reinterpret_cast<int*>(bulk_smem + kBulkStages * kBulkStageBytes);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s)
      bar_init(&full[s], 1), bar_init(&empty[s], kBulkConsumers);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  int total;
  if constexpr (kScan) {
    total = scan_items(groups, mnk, first, BulkItems<B>{});
  } else {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) first[g] = given_first[g];
    total = given_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) st[1] = now();
  const int begin = static_cast<int>(static_cast<int64_t>(total) * blockIdx.x / gridDim.x);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (blockIdx.x + 1) / gridDim.x);
  if (begin >= end) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int i = 0;
  if (warp == kBulkConsumers) {
    if (lane == 0) {
      B::for_each(groups, first, mnk, begin, end, [&](int g, int, int, int k, int row0, int rows) {
        const int s = i % kBulkStages;
        bar_wait(&empty[s], ((i / kBulkStages) & 1) ^ 1);
        if (i == 0) st[2] = now();
        ++i;
        bulk_load(bulk_smem + s * kBulkStageBytes,
                  static_cast<const Element*>(ptr_b[g]) + static_cast<size_t>(row0) * k,
                  static_cast<uint32_t>(rows * k * sizeof(Element)), &full[s]);
      });
      st[3] = now();
    }
  } else {
    int q0 = 0;
    B::for_each(groups, first, mnk, begin, end, [&](int g, int m, int n, int k, int row0, int rows) {
      const auto* a = static_cast<const Element*>(ptr_a[g]);
      auto* d = static_cast<ElementD*>(ptr_d[g]);
      const int pairs = (rows + 1) / 2;
      const int q1 = q0 + ((warp - q0) % kBulkConsumers + kBulkConsumers) % kBulkConsumers;
      const int first_pair = q0;
      q0 += pairs;
      const int s = i % kBulkStages;
      bar_wait(&full[s], (i / kBulkStages) & 1);
      if (i == 0 && warp == 0 && lane == 0) st[4] = now();
      ++i;
      const auto* tile = reinterpret_cast<const Element*>(bulk_smem + s * kBulkStageBytes);
      if constexpr (kFma)
        for (int q = q1; q < q0; q += kBulkConsumers) {
          const int r = (q - first_pair) * 2;
          B::template rows_of<true>(a, tile + r * k, d, m, n, k, row0 + r, min(2, rows - r));
        }
      __syncwarp();
      if (lane == 0) bar_arrive(&empty[s]);
    });
    if (lane == 0) atomicMax(&done, now());
  }
  __syncthreads();
  if (threadIdx.x == 0) st[5] = done;
}

int main() {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  const int E = 512, active = 22, N = 2688, K = 1024;
  using Bk = Bulk<bf16, 16, 1, 1>;  // the 16x1 relu2 config of the up projection
  bf16* w;
  CK(cudaMalloc(&w, size_t(E) * N * K * 2));
  CK(cudaMemset(w, 0x11, size_t(E) * N * K * 2));
  bf16 *a, *d;
  CK(cudaMalloc(&a, active * K * 2));
  CK(cudaMemset(a, 0x22, active * K * 2));
  CK(cudaMalloc(&d, active * N * 2));
  std::mt19937 rng(1);
  const int kSets = 4;
  int32_t* mnk[kSets];
  void** ptrs[kSets];
  int* firsts[kSets];
  int total = 0;
  for (int s = 0; s < kSets; ++s) {
    std::vector<int> perm(E);
    for (int i = 0; i < E; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> m(3 * E, 0);
    std::vector<void*> p(3 * E, nullptr);
    std::vector<int> f(E);
    int items = 0;
    for (int g = 0; g < E; ++g) {
      m[3 * g + 1] = N, m[3 * g + 2] = K;
      f[g] = items;
      p[g] = a, p[E + g] = w, p[2 * E + g] = d;
      if (g < active) {
        m[3 * g] = 1;
        p[g] = a + g * K, p[E + g] = w + size_t(perm[g]) * N * K, p[2 * E + g] = d + g * N;
        items += N / 16;
      }
    }
    total = items;
    CK(cudaMalloc(&mnk[s], m.size() * 4));
    CK(cudaMemcpy(mnk[s], m.data(), m.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&ptrs[s], p.size() * 8));
    CK(cudaMemcpy(ptrs[s], p.data(), p.size() * 8, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&firsts[s], E * 4));
    CK(cudaMemcpy(firsts[s], f.data(), E * 4, cudaMemcpyHostToDevice));
  }
  unsigned long long* stamps;
  CK(cudaMalloc(&stamps, sms * kStamps * 8));
  const size_t smem = size_t(kBulkStages) * kBulkStageBytes + 4 * E;
  auto go = [&](const char* name, auto kernel) {
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    auto launch = [&](int s, cudaStream_t t) {
      void** p = ptrs[s];
      kernel<<<sms, kBulkThreads, smem, t>>>(E, mnk[s], (const void* const*)p,
                                            (const void* const*)(p + E), (void* const*)(p + 2 * E),
                                            firsts[s], total, stamps);
    };
    const float us = graph_us([&](int r, cudaStream_t t) { launch(r % kSets, t); }, st);
    // One more launch after a cold set for the stamps (the previous call's tail is over).
    launch(1, st);
    launch(2, st);
    CK(cudaStreamSynchronize(st));
    std::vector<unsigned long long> h(sms * kStamps);
    CK(cudaMemcpy(h.data(), stamps, h.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull;
    for (int c = 0; c < sms; ++c) t0 = std::min(t0, h[c * kStamps]);
    printf("%-28s %7.2f us |", name, us);
    const char* lab[kStamps] = {"entry", "scan", "copy0", "copyN", "use0", "done"};
    for (int k = 0; k < kStamps; ++k) {
      std::vector<double> v;
      for (int c = 0; c < sms; ++c) v.push_back((h[c * kStamps + k] - t0) * 1e-3);
      std::sort(v.begin(), v.end());
      printf(" %s %.2f/%.2f/%.2f", lab[k], v[0], v[v.size() / 2], v.back());
    }
    printf("  (min/median/max us after the first CTA's entry)\n");
  };
  go("shipped (scan, FMAs)", stamped<Bk, true, true>);
  go("offsets given", stamped<Bk, false, true>);
  go("no FMAs", stamped<Bk, true, false>);
  go("offsets given, no FMAs", stamped<Bk, false, false>);
  go("shipped again", stamped<Bk, true, true>);
  return 0;
}

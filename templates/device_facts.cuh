// What a launch needs to know about a kernel on the current device that holds for the life of the
// process: its opt-in to more than 48 KB of shared memory (a function attribute of the device's
// context, so each GPU of a process needs its own) and how many of its blocks fit on an SM. Each
// is asked of the runtime once per device and remembered (host work only), so an eager call,
// outside a CUDA graph, pays for neither.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace autotune {

inline constexpr int kCachedDevices = 64;  // devices past this ask every time

// kKernel's opt-in to `bytes` of dynamic shared memory, the same `bytes` on every call.
template <auto kKernel>
cudaError_t opt_in_smem(int bytes) {
  static std::atomic<int> outcome[kCachedDevices];  // 0: not yet set, else 1 + the cudaError_t
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  auto set = [&] {
    const cudaError_t e =
        cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) cudaGetLastError();
    return e;
  };
  if (device < 0 || device >= kCachedDevices) return set();
  int o = outcome[device].load(std::memory_order_relaxed);
  if (o == 0) {
    o = 1 + static_cast<int>(set());
    outcome[device].store(o, std::memory_order_relaxed);
  }
  return static_cast<cudaError_t>(o - 1);
}

// kKernel's resident blocks per SM at `threads` threads and `smem` bytes of dynamic shared memory
// (0 where none fits or the query fails). Remembers the last sizes asked per device: a layer asks
// the same ones call after call.
template <auto kKernel>
int blocks_per_sm(int threads, size_t smem) {
  // threads (16 bits) | smem (32 bits) | 1 + blocks (16 bits); 0: nothing asked yet.
  static std::atomic<uint64_t> last[kCachedDevices];
  auto ask = [&] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, threads, smem) !=
        cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return blocks;
  };
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device < 0 || device >= kCachedDevices || threads >= (1 << 16) || smem >= (size_t(1) << 32))
    return ask();
  const uint64_t key = uint64_t(threads) << 48 | uint64_t(smem) << 16;
  const uint64_t seen = last[device].load(std::memory_order_relaxed);
  if (seen != 0 && (seen & ~uint64_t(0xffff)) == key) return int(seen & 0xffff) - 1;
  const int blocks = ask();
  last[device].store(key | uint64_t(blocks + 1), std::memory_order_relaxed);
  return blocks;
}

}  // namespace autotune

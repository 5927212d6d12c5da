// What every grouped-GEMM library shares, whatever the CUTLASS generation: the C ABI's status
// codes and error text, the setup kernels that write per-group arguments on the device, and the
// run / run_dense entry points. An architecture's GroupedGemm supplies its argument layout
// (an Args type with a __device__ set(g, m, n, k, a, b, d)) and a static launch(...).
//
// Every entry point also takes the tile scheduler's runtime arguments (raster order and swizzle):
// they change only the order in which CTAs walk the output tiles (L2 reuse), so the tuner can
// search them without a recompile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#define AUTOTUNE_EXPORT extern "C" __attribute__((visibility("default")))

namespace autotune {

// Status codes shared with autotune/runtime.py.
enum Status : int {
  kOk = 0,
  kBadArgument = 1,
  kWorkspaceTooSmall = 2,
  kCannotImplement = 3,
  kInitializeFailed = 4,
  kLaunchFailed = 5,
};

inline thread_local char g_last_error[512] = "";

inline int fail(int status, const char* what, const char* detail = "") {
  std::snprintf(g_last_error, sizeof(g_last_error), "%s%s%s", what, detail[0] ? ": " : "", detail);
  return status;
}

// raster: 0 walks output tiles along M first, 1 along N; swizzle: 1, 2, 4 or 8 tiles per band.
struct Schedule {
  int raster;
  int swizzle;
};

inline bool schedule_ok(Schedule s) {
  return (s.raster == 0 || s.raster == 1) &&
         (s.swizzle == 1 || s.swizzle == 2 || s.swizzle == 4 || s.swizzle == 8);
}

inline constexpr size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

template <class Args>
__global__ void fill_group_arguments(int groups, const int32_t* __restrict__ mnk,
                                     const void* const* ptr_a, const void* const* ptr_b,
                                     void* const* ptr_d, Args out) {
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x)
    out.set(g, mnk[3 * g], mnk[3 * g + 1], mnk[3 * g + 2], ptr_a[g], ptr_b[g], ptr_d[g]);
}

template <class Args>
__global__ void fill_dense_arguments(int m, int n, int k, const void* a, const void* b, void* d,
                                     Args out) {
  out.set(0, m, n, k, a, b, d);
}

// run: groups with shapes and pointers already in device arrays (the MoE experts).
// run_dense: one group with its shape and pointers as plain arguments (the latent projections,
// which need no per-expert bookkeeping).
template <class Derived>
struct GroupedGemmEntry {
  static int run(int groups, const int32_t* mnk, const void* const* ptr_a, const void* const* ptr_b,
                 void* const* ptr_d, void* workspace, size_t workspace_bytes, int sm_count,
                 int raster, int swizzle, cudaStream_t stream) {
    if (groups <= 0 || mnk == nullptr || ptr_a == nullptr || ptr_b == nullptr || ptr_d == nullptr)
      return fail(kBadArgument, "groups must be > 0 and the shape/pointer arrays non-null");
    Schedule sched{raster, swizzle};
    if (!schedule_ok(sched)) return fail(kBadArgument, "raster must be 0/1, swizzle 1/2/4/8");
    int threads = 128, blocks = (groups + threads - 1) / threads;
    return Derived::launch(groups, workspace, workspace_bytes, sm_count, sched, stream,
                           [&](auto args) {
      fill_group_arguments<<<blocks, threads, 0, stream>>>(groups, mnk, ptr_a, ptr_b, ptr_d, args);
    });
  }

  static int run_dense(int m, int n, int k, const void* a, const void* b, void* d,
                       void* workspace, size_t workspace_bytes, int sm_count, int raster,
                       int swizzle, cudaStream_t stream) {
    if (m < 0 || n <= 0 || k <= 0 || a == nullptr || b == nullptr || d == nullptr)
      return fail(kBadArgument, "m >= 0, n > 0, k > 0 and non-null pointers are required");
    Schedule sched{raster, swizzle};
    if (!schedule_ok(sched)) return fail(kBadArgument, "raster must be 0/1, swizzle 1/2/4/8");
    return Derived::launch(1, workspace, workspace_bytes, sm_count, sched, stream,
                           [&](auto args) {
      fill_dense_arguments<<<1, 1, 0, stream>>>(m, n, k, a, b, d, args);
    });
  }
};

}  // namespace autotune

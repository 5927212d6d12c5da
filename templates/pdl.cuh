// Programmatic dependent launch (sm90 and newer) for the routing and gemv kernels.
//
// A kernel launched with launch<true> may be scheduled while the kernel before it in the stream
// is still running: as soon as every CTA of that kernel has called launch_dependents() (or
// exited). Its CTAs then do what needs nothing from earlier kernels (barrier setup; the combine
// launch streams its constant fc2 weights) and block in wait() until the earlier kernel has
// completed and its writes are visible. In a chain of such launches each wait() also covers
// every kernel before, since the kernel waited on completes only after its own wait().
//
// The contract of every kernel here: each thread calls wait() before it reads anything an
// earlier kernel wrote or writes any global memory (an earlier kernel may still read it), and
// before it exits. launch_dependents() comes first: the next kernel's CTAs can then take the
// SMs' spare slots and their launch latency overlaps this kernel's work. Where a decode forward
// is five short kernels (one token: about 90 us in all) that latency and each kernel's ramp are
// microseconds apiece.
//
// On older architectures both are no-ops and the library launches without the attribute: a
// kernel whose code cannot wait must never be launched early (kPdl is false for sm80/sm89
// libraries, whose PTX is compiled without these instructions even when it runs on an H200).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace autotune::pdl {

__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both at a kernel's top, for kernels with nothing to do before the earlier kernels end.
__device__ __forceinline__ void enter() {
  launch_dependents();
  wait();
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to start early when kPdl (a stream
// capture records the early start as a programmatic edge of the graph). Returns the launch's
// error, else any earlier one that cudaGetLastError holds, and clears the latter either way.
template <bool kPdl, class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = kPdl ? attr : nullptr;
  config.numAttrs = kPdl ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();
  return e != cudaSuccess ? e : last;
}

}  // namespace autotune::pdl

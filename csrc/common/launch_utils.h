// Host-side helpers shared by the launchers.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

namespace flash {

// Runtime flag -> compile-time constant: f is instantiated for both values and called with one.
template <class F>
auto bool_switch(bool condition, F &&f) {
  return condition ? f(std::true_type{}) : f(std::false_type{});
}

// Raises the kernel's dynamic shared-memory limit (above 48 KB needs it), then launches.
template <class Params>
cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, int threads, int smem_size, Params const &params,
                          cudaStream_t stream) {
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_size);
      err != cudaSuccess) {
    return err;
  }
  kernel<<<grid, threads, smem_size, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash

// Host-side helpers shared by the launchers.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

namespace flash {

// Runtime flag -> compile-time constant: f is instantiated for both values and called with one.
template <class F>
auto bool_switch(bool condition, F &&f) {
  return condition ? f(std::true_type{}) : f(std::false_type{});
}

// The kernels' two variant flags from the params (mask.h: Windowed, and General for what needs_general()
// lists): f(windowed, general), each a std::bool_constant, instantiated for the four combinations.
template <class Params, class F>
auto variant_switch(Params const &params, F &&f) {
  return bool_switch(params.is_windowed, [&](auto windowed) {
    return bool_switch(params.needs_general(), [&](auto general) { return f(windowed, general); });
  });
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

// The current device's SM count, asked of the driver once per device (persistent grids size by it at every
// launch).
inline cudaError_t current_sm_count(int &sm_count) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> known[kCachedDevices] = {};  // 0: not asked yet
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) { return err; }
  if (device < kCachedDevices && (sm_count = known[device].load(std::memory_order_relaxed)) > 0) { return cudaSuccess; }
  if (cudaError_t err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess) {
    return err;
  }
  if (device < kCachedDevices) { known[device].store(sm_count, std::memory_order_relaxed); }
  return cudaSuccess;
}

}  // namespace flash

// What the torch-free tile sweeps (tile_sweep.cu, tile_sweep_sm90.cu, tile_sweep_sm90_bwd.cu) share: a CUDA
// error check, random inputs and a comparison of two results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define CHECK(call)                                                                      \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// Uniform values in [-1, 1) from a hash of the index: random enough, and never all zeros.
template <typename Element>
__global__ void fill_random(Element *p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = Element(float(h >> 8) / float(1 << 23) - 1.f);
  }
}

// The largest |a - b| and |b| over n elements, into two floats kept as bits (non-negative floats order as
// their bits do, so atomicMax on the bits is a max); a NaN difference counts as +inf.
template <typename T>
__global__ void max_abs_diff(T const *a, T const *b, size_t n, unsigned *diff_ref) {
  float d = 0.f, r = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float const e = fabsf(float(a[i]) - float(b[i]));
    d = fmaxf(d, e == e ? e : INFINITY);  // fmaxf would drop the NaN
    r = fmaxf(r, fabsf(float(b[i])));
  }
  atomicMax(&diff_ref[0], __float_as_uint(d));
  atomicMax(&diff_ref[1], __float_as_uint(r));
}

// {max |a - b|, max |b|} over n elements.
template <typename T>
void compare(T const *a, T const *b, size_t n, unsigned *scratch, float out[2]) {
  CHECK(cudaMemset(scratch, 0, 2 * sizeof(unsigned)));
  max_abs_diff<<<1024, 256>>>(a, b, n, scratch);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(out, scratch, 2 * sizeof(float), cudaMemcpyDeviceToHost));
}

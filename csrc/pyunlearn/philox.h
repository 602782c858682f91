// Philox4x32-10 counter-based generator and the float32 Box-Muller transform of pyunlearn.ops.rng.
//
// The contract (see pyunlearn/ops/rng.py): element i of the noise at (seed, step, stream) uses
//   key     = (seed mod 2^32, seed div 2^32)
//   counter = (q mod 2^32, q div 2^32, step mod 2^32, stream),  q = i div 4
// and lane i mod 4 of the Box-Muller pair computed in float32 from the four 32-bit outputs.
#pragma once

#include <cstdint>

// Shared with the CUDA kernels (csrc/pyunlearn/cuda/), which call the same functions on the device.
#if defined(__CUDACC__)
#define PYUNLEARN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYUNLEARN_HOST_DEVICE inline
#endif

namespace pyunlearn {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Ten rounds in place on c[0..3] with key (k0, k1). Written with plain 64-bit products so that the
// compiler vectorises loops calling it (widening 32x32 multiplies).
PYUNLEARN_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                          uint32_t k1) {
#if defined(__clang__) || defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The noise key of a seed in [0, 2^63).
struct NoiseKey {
  uint32_t k0, k1, step, stream;
};

PYUNLEARN_HOST_DEVICE NoiseKey make_noise_key(uint64_t seed, uint64_t step, uint32_t stream) {
  return NoiseKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                  static_cast<uint32_t>(step), stream};
}

// Standard normal float32 noise for the quads q0 .. q0 + nq - 1 (global elements 4 q0 .. 4 (q0 + nq) - 1),
// written to out[0 .. 4 nq - 1]. Vectorised; defined in noise.cpp.
void normal_quads(const NoiseKey& key, uint64_t q0, int64_t nq, float* out);

// Noise for global element indices [first, first + n), written to out[0 .. n - 1]; any alignment.
// scratch must hold 4 * (n / 4 + 2) floats.
void normal_range(const NoiseKey& key, uint64_t first, int64_t n, float* out);

}  // namespace pyunlearn

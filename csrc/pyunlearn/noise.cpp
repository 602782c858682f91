// Vectorised Philox4x32-10 + Box-Muller noise (the C++ twin of pyunlearn.ops.rng.gaussian_noise).
//
// No FMA contraction in this file: every clone (AVX-512, AVX2, baseline) rounds each operation the
// same way, so the noise is bit-identical across CPUs, thread counts and tensor splits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <cmath>

#include "philox.h"
#include "simd.h"

namespace pyunlearn {

namespace {

constexpr float kTwoPowM32 = 2.3283064365386963e-10f;  // 2^-32
constexpr float kTwoPowM33 = 1.1641532182693481e-10f;  // 2^-33
constexpr float kTwoPi = 6.2831854820251465f;          // float32(2 pi)

}  // namespace

// Staged over tiles of kTile quads (structure of arrays: Philox, then radius, then angle, then the
// interleaved products), each stage a simple loop that vectorises on its own.
PYUNLEARN_CLONES PYUNLEARN_FLATTEN void normal_quads(const NoiseKey& key, uint64_t q0, int64_t nq, float* out) {
  constexpr int64_t kTile = 256;
  uint32_t r[4][kTile];
  float radius[2][kTile], cosv[2][kTile], sinv[2][kTile];
  const uint32_t k0 = key.k0, k1 = key.k1, step = key.step, stream = key.stream;
  for (int64_t base = 0; base < nq; base += kTile) {
    const int64_t len = nq - base < kTile ? nq - base : kTile;
    const uint64_t qb = q0 + static_cast<uint64_t>(base);
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t q = qb + static_cast<uint64_t>(j);
      uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = step, c3 = stream;
      philox4x32_10(c0, c1, c2, c3, k0, k1);
      r[0][j] = c0;
      r[1][j] = c1;
      r[2][j] = c2;
      r[3][j] = c3;
    }
    for (int h = 0; h < 2; ++h) {
      const uint32_t* ra = r[2 * h];
      const uint32_t* rb = r[2 * h + 1];
      for (int64_t j = 0; j < len; ++j) {
        const float ua = static_cast<float>(ra[j]) * kTwoPowM32 + kTwoPowM33;
        radius[h][j] = std::sqrt(-2.0f * static_cast<float>(simd::log_positive(ua)));
      }
      for (int64_t j = 0; j < len; ++j) {
        const float ub = static_cast<float>(rb[j]) * kTwoPowM32 + kTwoPowM33;
        simd::sincos_small(kTwoPi * ub, cosv[h][j], sinv[h][j]);
      }
    }
    float* o = out + 4 * base;
    for (int64_t j = 0; j < len; ++j) {
      o[4 * j + 0] = radius[0][j] * cosv[0][j];
      o[4 * j + 1] = radius[0][j] * sinv[0][j];
      o[4 * j + 2] = radius[1][j] * cosv[1][j];
      o[4 * j + 3] = radius[1][j] * sinv[1][j];
    }
  }
}

void normal_range(const NoiseKey& key, uint64_t first, int64_t n, float* out) {
  if (n <= 0) return;
  constexpr int64_t kChunkQuads = 256;
  float buf[4 * kChunkQuads];
  const uint64_t last = first + static_cast<uint64_t>(n) - 1;
  int64_t written = 0;
  for (uint64_t q = first >> 2; q <= (last >> 2); q += kChunkQuads) {
    const int64_t nq = std::min<int64_t>(kChunkQuads, static_cast<int64_t>((last >> 2) - q + 1));
    normal_quads(key, q, nq, buf);
    const uint64_t lo = std::max<uint64_t>(first, 4 * q);
    const uint64_t hi = std::min<uint64_t>(last + 1, 4 * (q + static_cast<uint64_t>(nq)));
    std::copy(buf + (lo - 4 * q), buf + (hi - 4 * q), out + written);
    written += static_cast<int64_t>(hi - lo);
  }
}

}  // namespace pyunlearn

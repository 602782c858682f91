// ChaCha20 counter-mode noise and the keyed fingerprint weights of pyunlearn.ops.rng / ops.reference,
// as scalar host/device functions shared by the C++ CPU kernels and the CUDA kernels.
//
// The contract (pyunlearn/ops/rng.py): element i of the noise with key k at (step, stream) lies in block
// b = i / 4 of the RFC 8439 block function with counter b mod 2^32 and nonce (b >> 32, step, stream);
// the 16 output words make two Box-Muller pairs from 128-bit uniforms, evaluated in float64 with only
// IEEE +, -, *, / and sqrt in a fixed order (no FMA contraction: compile with -ffp-contract=off or
// --fmad=false), so every backend gives bit-identical noise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYUNLEARN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYUNLEARN_HOST_DEVICE inline
#endif

namespace pyunlearn {

// 256-bit key and the (step, stream) nonce words of one noise draw.
struct NoiseKey {
  uint32_t k[8];
  uint32_t step, stream;
};

PYUNLEARN_HOST_DEVICE uint32_t rotl32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

#define PYUNLEARN_QR(a, b, c, d)   \
  a += b; d = rotl32(d ^ a, 16);   \
  c += d; b = rotl32(b ^ c, 12);   \
  a += b; d = rotl32(d ^ a, 8);    \
  c += d; b = rotl32(b ^ c, 7)

// RFC 8439 block function: out = 20 rounds of (constants, key, counter, nonce) plus the input.
PYUNLEARN_HOST_DEVICE void chacha20_block(const uint32_t key[8], uint32_t counter, uint32_t n0, uint32_t n1,
                                          uint32_t n2, uint32_t out[16]) {
  uint32_t x0 = 0x61707865u, x1 = 0x3320646eu, x2 = 0x79622d32u, x3 = 0x6b206574u;
  uint32_t x4 = key[0], x5 = key[1], x6 = key[2], x7 = key[3], x8 = key[4], x9 = key[5], x10 = key[6],
           x11 = key[7];
  uint32_t x12 = counter, x13 = n0, x14 = n1, x15 = n2;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    PYUNLEARN_QR(x0, x4, x8, x12);
    PYUNLEARN_QR(x1, x5, x9, x13);
    PYUNLEARN_QR(x2, x6, x10, x14);
    PYUNLEARN_QR(x3, x7, x11, x15);
    PYUNLEARN_QR(x0, x5, x10, x15);
    PYUNLEARN_QR(x1, x6, x11, x12);
    PYUNLEARN_QR(x2, x7, x8, x13);
    PYUNLEARN_QR(x3, x4, x9, x14);
  }
  out[0] = x0 + 0x61707865u;
  out[1] = x1 + 0x3320646eu;
  out[2] = x2 + 0x79622d32u;
  out[3] = x3 + 0x6b206574u;
  out[4] = x4 + key[0];
  out[5] = x5 + key[1];
  out[6] = x6 + key[2];
  out[7] = x7 + key[3];
  out[8] = x8 + key[4];
  out[9] = x9 + key[5];
  out[10] = x10 + key[6];
  out[11] = x11 + key[7];
  out[12] = x12 + counter;
  out[13] = x13 + n0;
  out[14] = x14 + n1;
  out[15] = x15 + n2;
}

#undef PYUNLEARN_QR

namespace noise_detail {

constexpr double kTwoM32 = 2.3283064365386962890625e-10;  // 2^-32
constexpr double kTwoM29 = 1.862645149230957031250e-09;   // 2^-29
constexpr double kPi4 = 0.78539816339744830962;           // float64(pi / 4)
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kSqrt2 = 1.4142135623730951;

// ((((w0 + 1/2) 2^-32 + w1) 2^-32 + w2) 2^-32 + w3) * top, in this order.
PYUNLEARN_HOST_DEVICE double unit128(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, double top) {
  double v = (static_cast<double>(w0) + 0.5) * kTwoM32;
  v = (v + static_cast<double>(w1)) * kTwoM32;
  v = (v + static_cast<double>(w2)) * kTwoM32;
  return (v + static_cast<double>(w3)) * top;
}

PYUNLEARN_HOST_DEVICE uint64_t bits_of(double x) {
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = static_cast<uint64_t>(__double_as_longlong(x));
#else
  std::memcpy(&b, &x, sizeof b);
#endif
  return b;
}

PYUNLEARN_HOST_DEVICE double double_of(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// log u for a positive normal double: u = m 2^e, m in [sqrt(1/2), sqrt(2)), 2 atanh((m-1)/(m+1)) by its
// series through s^23 (coefficients 1/(2k+1)), then (2 s p + e ln2_lo) + e ln2_hi.
PYUNLEARN_HOST_DEVICE double log_positive(double u) {
  const uint64_t b = bits_of(u);
  int64_t e = static_cast<int64_t>((b >> 52) & 0x7FF) - 1023;
  double m = double_of((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool big = m > kSqrt2;
  const double half = m * 0.5;
  m = big ? half : m;
  e = big ? e + 1 : e;
  const double ed = static_cast<double>(e);
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double s2 = s * s;
  double p = 1.0 / 23.0;
  p = p * s2 + 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0;
  p = p * s2 + 1.0 / 17.0;
  p = p * s2 + 1.0 / 15.0;
  p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  return (2.0 * s * p + ed * kLn2Lo) + ed * kLn2Hi;
}

// sin and cos on (0, pi/4]: a + a a2 S(a2), 1 + a2 C(a2) with Taylor coefficients (Horner from the top).
PYUNLEARN_HOST_DEVICE void sincos_octant(double a, double& s, double& c) {
  const double a2 = a * a;
  // (-1)^(k+1) / (2k+3)!, k = 7 .. 0
  double sp = 1.0 / 355687428096000.0;
  sp = sp * a2 + -1.0 / 1307674368000.0;
  sp = sp * a2 + 1.0 / 6227020800.0;
  sp = sp * a2 + -1.0 / 39916800.0;
  sp = sp * a2 + 1.0 / 362880.0;
  sp = sp * a2 + -1.0 / 5040.0;
  sp = sp * a2 + 1.0 / 120.0;
  sp = sp * a2 + -1.0 / 6.0;
  // (-1)^(k+1) / (2k+2)!, k = 8 .. 0
  double cp = -1.0 / 6402373705728000.0;
  cp = cp * a2 + 1.0 / 20922789888000.0;
  cp = cp * a2 + -1.0 / 87178291200.0;
  cp = cp * a2 + 1.0 / 479001600.0;
  cp = cp * a2 + -1.0 / 3628800.0;
  cp = cp * a2 + 1.0 / 40320.0;
  cp = cp * a2 + -1.0 / 720.0;
  cp = cp * a2 + 1.0 / 24.0;
  cp = cp * a2 + -1.0 / 2.0;
  s = a + a * a2 * sp;
  c = 1.0 + a2 * cp;
}

}  // namespace noise_detail

// Two standard normals (cosine, sine) from radius words r[0..3] and angle words a[0..3].
PYUNLEARN_HOST_DEVICE void box_muller128(const uint32_t* r, const uint32_t* a, double& z_cos, double& z_sin) {
  using namespace noise_detail;
  const double u = unit128(r[0], r[1], r[2], r[3], kTwoM32);
  const double radius = sqrt(-2.0 * log_positive(u));
  const uint32_t quadrant = a[3] >> 30;
  const bool upper = ((a[3] >> 29) & 1u) != 0u;
  const uint32_t flip = upper ? 0xFFFFFFFFu : 0u;
  const double t = unit128(a[0] ^ flip, a[1] ^ flip, a[2] ^ flip, (a[3] ^ flip) & 0x1FFFFFFFu, kTwoM29);
  double s, c;
  sincos_octant(t * kPi4, s, c);
  const double ci = upper ? s : c, si = upper ? c : s;  // within the quadrant
  double cv, sv;
  switch (quadrant) {
    case 0: cv = ci; sv = si; break;
    case 1: cv = -si; sv = ci; break;
    case 2: cv = -ci; sv = -si; break;
    default: cv = si; sv = -ci; break;
  }
  z_cos = radius * cv;
  z_sin = radius * sv;
}

// The four normals of block b (global elements 4b .. 4b + 3).
PYUNLEARN_HOST_DEVICE void normals_of_block(const NoiseKey& key, uint64_t b, double z[4]) {
  uint32_t w[16];
  chacha20_block(key.k, static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), key.step, key.stream, w);
  box_muller128(w + 0, w + 4, z[0], z[1]);
  box_muller128(w + 8, w + 12, z[2], z[3]);
}

// The release grid of a noisy float32 value (pyunlearn.ops.rng.release_grid / snap): with
// E = floor(log2 scale), values |v| < region = 2^(E-7) are released on the grid h = 2^(E-30), so release
// cells near 0 never get finer than the float64 grid of centre + sigma z (no sparse support there).
struct ReleaseGrid {
  double h = 0.0, inv_h = 0.0, region = 0.0;  // region 0: no snapping (scale 0)
};

inline ReleaseGrid release_grid(double scale) {
  ReleaseGrid grid;
  if (!(scale > 0.0)) return grid;
  int e = 0;
  (void)std::frexp(scale, &e);  // scale = m 2^e, m in [0.5, 1)
  grid.h = std::ldexp(1.0, e - 1 - 30);
  grid.inv_h = std::ldexp(1.0, -(e - 1 - 30));
  grid.region = std::ldexp(1.0, e - 1 - 7);
  return grid;
}

// The float32 release of the float64 value v on the grid (round half to even via 1.5 * 2^52).
PYUNLEARN_HOST_DEVICE float release32(double v, const ReleaseGrid& grid) {
  constexpr double kMagic = 6755399441055744.0;
  const double on_grid = ((v * grid.inv_h + kMagic) - kMagic) * grid.h;
  return static_cast<float>(fabs(v) < grid.region ? on_grid : v);
}

// Keyed fingerprint weight of global element i (pyunlearn.ops.reference.fingerprint_weights).
PYUNLEARN_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

PYUNLEARN_HOST_DEVICE double fingerprint_weight(uint64_t i, uint32_t k0, uint32_t k1) {
  const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(i) ^ k0) ^ static_cast<uint32_t>(i >> 32) ^ k1);
  return static_cast<double>(static_cast<int32_t>(h) >> 8) * 1.1920928955078125e-07;  // 2^-23
}

}  // namespace pyunlearn

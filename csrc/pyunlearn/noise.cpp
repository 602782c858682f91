// Vectorised ChaCha20 + float64 Box-Muller noise: the CPU twin of pyunlearn.ops.rng.gaussian_noise and of
// the scalar chacha.h, bit for bit.
//
// Structure of arrays: ChaCha20 runs 16 blocks at a time, one block per vector lane (each of the 16 state
// words is a vector; the loop over the 16 lanes is what GCC vectorises), and writes the 16 output words as
// 16 arrays. Box-Muller then runs over those arrays in float64 with the branch-free polynomials of
// chacha.h (selects only), in stages that each vectorise on their own.
//
// Bit-identity with the reference: the same IEEE operations in the same order as chacha.h, no FMA
// contraction (below) and no fast-math; the rewrites used here are exact:
//   * the exponent e of u is formed as a double, double_of(2^52 | (bits >> 52)) - (2^52 + 1023), exact,
//     instead of an int64 -> double conversion (which AVX2 lacks; GCC would not vectorise the loop);
//   * the quadrant switch of box_muller128 becomes selects and exact negations.
// so every clone (AVX-512, AVX2, baseline) gives the same bits as the scalar code, on every CPU and for
// any split into threads or tensors.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pyunlearn {

namespace {

using namespace noise_detail;

// NOTE: a plain conversion: vcvtudq2pd on AVX-512, and GCC's exact signed-conversion sequence on AVX2.
// Measured (4.5M values, 1 thread): the hand-written double(int32(w ^ 2^31)) + 2^31 was 7% slower on the
// AVX-512 clone (3 instructions instead of 1) and no faster on AVX2.
inline double u32_to_double(uint32_t w) { return static_cast<double>(w); }

inline uint64_t dbits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline double dof(uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// unit128 of chacha.h.
inline double unit4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, double top) {
  double v = (u32_to_double(w0) + 0.5) * kTwoM32;
  v = (v + u32_to_double(w1)) * kTwoM32;
  v = (v + u32_to_double(w2)) * kTwoM32;
  return (v + u32_to_double(w3)) * top;
}

// log_positive of chacha.h (u positive and normal).
inline double log_pos(double u) {
  const uint64_t b = dbits(u);
  // e and e + 1 as exact doubles: (2^52 + biased exponent) - (2^52 + 1023) (u > 0: no sign bit).
  const double biased = dof(0x4330000000000000ull | (b >> 52));
  const double e0 = biased - 4503599627371519.0;  // 2^52 + 1023
  const double e1 = biased - 4503599627371518.0;  // 2^52 + 1022
  double m = dof((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool big = m > kSqrt2;
  const double half = m * 0.5;
  m = big ? half : m;
  const double ed = big ? e1 : e0;
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

// The 16 words of a block live in 16 scalars; the caller's loop over lanes is vectorised.
#define PYUNLEARN_QR(a, b, c, d)   \
  a += b; d = rotl32(d ^ a, 16);   \
  c += d; b = rotl32(b ^ c, 12);   \
  a += b; d = rotl32(d ^ a, 8);    \
  c += d; b = rotl32(b ^ c, 7)

}  // namespace

// NOTE (measured, see the report in the commit): one 16-lane group per inner loop keeps the 16 state
// vectors in the 32 zmm registers of AVX-512 (vprold does the rotations); the fully unrolled 20 rounds
// are straight-line code, so the lane loop is what GCC vectorises.
PYUNLEARN_CLONES PYUNLEARN_FLATTEN void chacha20_groups(const NoiseKey& key, uint64_t b0, int64_t ngroups,
                                                        uint32_t* __restrict w) {
  constexpr int64_t stride = kNoiseMaxBlocks;
  const uint32_t k0 = key.k[0], k1 = key.k[1], k2 = key.k[2], k3 = key.k[3], k4 = key.k[4], k5 = key.k[5],
                 k6 = key.k[6], k7 = key.k[7];
  const uint32_t n1 = key.step, n2 = key.stream;
  const uint32_t lo0 = static_cast<uint32_t>(b0), hi0 = static_cast<uint32_t>(b0 >> 32);
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    uint32_t* __restrict out = w + gi * kNoiseGroup;
    const uint32_t jbase = static_cast<uint32_t>(gi * kNoiseGroup);
    for (uint32_t l = 0; l < static_cast<uint32_t>(kNoiseGroup); ++l) {
      const uint32_t ctr = lo0 + (jbase + l);
      const uint32_t n0 = hi0 + (ctr < lo0 ? 1u : 0u);  // carry into the high word (at most one wrap)
      uint32_t x0 = 0x61707865u, x1 = 0x3320646eu, x2 = 0x79622d32u, x3 = 0x6b206574u;
      uint32_t x4 = k0, x5 = k1, x6 = k2, x7 = k3, x8 = k4, x9 = k5, x10 = k6, x11 = k7;
      uint32_t x12 = ctr, x13 = n0, x14 = n1, x15 = n2;
#pragma GCC unroll 10
      for (int r = 0; r < 10; ++r) {
        PYUNLEARN_QR(x0, x4, x8, x12);
        PYUNLEARN_QR(x1, x5, x9, x13);
        PYUNLEARN_QR(x2, x6, x10, x14);
        PYUNLEARN_QR(x3, x7, x11, x15);
        PYUNLEARN_QR(x0, x5, x10, x15);
        PYUNLEARN_QR(x1, x6, x11, x12);
        PYUNLEARN_QR(x2, x7, x8, x13);
        PYUNLEARN_QR(x3, x4, x9, x14);
      }
      out[0 * stride + l] = x0 + 0x61707865u;
      out[1 * stride + l] = x1 + 0x3320646eu;
      out[2 * stride + l] = x2 + 0x79622d32u;
      out[3 * stride + l] = x3 + 0x6b206574u;
      out[4 * stride + l] = x4 + k0;
      out[5 * stride + l] = x5 + k1;
      out[6 * stride + l] = x6 + k2;
      out[7 * stride + l] = x7 + k3;
      out[8 * stride + l] = x8 + k4;
      out[9 * stride + l] = x9 + k5;
      out[10 * stride + l] = x10 + k6;
      out[11 * stride + l] = x11 + k7;
      out[12 * stride + l] = x12 + ctr;
      out[13 * stride + l] = x13 + n0;
      out[14 * stride + l] = x14 + n1;
      out[15 * stride + l] = x15 + n2;
    }
  }
}

#undef PYUNLEARN_QR

namespace {

// Box-Muller over arrays, one pair per lane j: the radius sqrt(-2 log u) from words r0..r3 ...
PYUNLEARN_FLATTEN inline void radius_array(const uint32_t* __restrict r0, const uint32_t* __restrict r1,
                                           const uint32_t* __restrict r2, const uint32_t* __restrict r3, int64_t n,
                                           double* __restrict radius) {
  for (int64_t j = 0; j < n; ++j) {
    const double u = unit4(r0[j], r1[j], r2[j], r3[j], kTwoM32);
    radius[j] = std::sqrt(-2.0 * log_pos(u));
  }
}

// ... and (cos, sin) of the angle from words a0..a3 (box_muller128 of chacha.h, the quadrant switch as
// selects and exact negations).
PYUNLEARN_FLATTEN inline void angle_array(const uint32_t* __restrict a0, const uint32_t* __restrict a1,
                                          const uint32_t* __restrict a2, const uint32_t* __restrict a3, int64_t n,
                                          double* __restrict cosv, double* __restrict sinv) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t top = a3[j];
    const uint32_t flip = ((top >> 29) & 1u) != 0u ? 0xFFFFFFFFu : 0u;
    const double t = unit4(a0[j] ^ flip, a1[j] ^ flip, a2[j] ^ flip, (top ^ flip) & 0x1FFFFFFFu, kTwoM29);
    const double a = t * kPi4;
    const double a2 = a * a;
    double sp = 1.0 / 355687428096000.0;
    sp = sp * a2 + -1.0 / 1307674368000.0;
    sp = sp * a2 + 1.0 / 6227020800.0;
    sp = sp * a2 + -1.0 / 39916800.0;
    sp = sp * a2 + 1.0 / 362880.0;
    sp = sp * a2 + -1.0 / 5040.0;
    sp = sp * a2 + 1.0 / 120.0;
    sp = sp * a2 + -1.0 / 6.0;
    double cp = -1.0 / 6402373705728000.0;
    cp = cp * a2 + 1.0 / 20922789888000.0;
    cp = cp * a2 + -1.0 / 87178291200.0;
    cp = cp * a2 + 1.0 / 479001600.0;
    cp = cp * a2 + -1.0 / 3628800.0;
    cp = cp * a2 + 1.0 / 40320.0;
    cp = cp * a2 + -1.0 / 720.0;
    cp = cp * a2 + 1.0 / 24.0;
    cp = cp * a2 + -1.0 / 2.0;
    const double s = a + a * a2 * sp;
    const double c = 1.0 + a2 * cp;
    const bool upper = flip != 0u;
    const double ci = upper ? s : c, si = upper ? c : s;  // within the quadrant
    const uint32_t q = top >> 30;
    // quadrant 0: (ci, si); 1: (-si, ci); 2: (-ci, -si); 3: (si, -ci)
    const bool swap = (q & 1u) != 0u;
    const double cm = swap ? si : ci, sm = swap ? ci : si;
    const bool neg_c = q == 1u || q == 2u, neg_s = q >= 2u;
    cosv[j] = neg_c ? -cm : cm;
    sinv[j] = neg_s ? -sm : sm;
  }
}

}  // namespace

PYUNLEARN_CLONES PYUNLEARN_FLATTEN void normals_of_blocks(const NoiseKey& key, uint64_t b0, int64_t nb,
                                                          double* __restrict z) {
  constexpr int64_t S = kNoiseMaxBlocks;
  alignas(64) uint32_t w[16 * S];
  alignas(64) double radius[2][S], cosv[2][S], sinv[2][S];
  const int64_t ngroups = (nb + kNoiseGroup - 1) / kNoiseGroup;
  chacha20_groups(key, b0, ngroups, w);
  for (int h = 0; h < 2; ++h) {
    const uint32_t* r = w + 8 * h * S;
    radius_array(r, r + S, r + 2 * S, r + 3 * S, nb, radius[h]);
    angle_array(r + 4 * S, r + 5 * S, r + 6 * S, r + 7 * S, nb, cosv[h], sinv[h]);
  }
  for (int64_t j = 0; j < nb; ++j) {
    z[4 * j + 0] = radius[0][j] * cosv[0][j];
    z[4 * j + 1] = radius[0][j] * sinv[0][j];
    z[4 * j + 2] = radius[1][j] * cosv[1][j];
    z[4 * j + 3] = radius[1][j] * sinv[1][j];
  }
}

void normal_range(const NoiseKey& key, uint64_t first, int64_t n, double* out) {
  if (n <= 0) return;
  alignas(64) double buf[4 * kNoiseMaxBlocks];
  const uint64_t last = first + static_cast<uint64_t>(n) - 1;
  int64_t written = 0;
  for (uint64_t b = first >> 2; b <= (last >> 2); b += kNoiseMaxBlocks) {
    const int64_t nb = std::min<int64_t>(kNoiseMaxBlocks, static_cast<int64_t>((last >> 2) - b + 1));
    normals_of_blocks(key, b, nb, buf);
    const uint64_t lo = std::max<uint64_t>(first, 4 * b);
    const uint64_t hi = std::min<uint64_t>(last + 1, 4 * (b + static_cast<uint64_t>(nb)));
    std::copy(buf + (lo - 4 * b), buf + (hi - 4 * b), out + written);
    written += static_cast<int64_t>(hi - lo);
  }
}

}  // namespace pyunlearn

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

// NOTE: a plain conversion (GCC vectorises it as a signed conversion plus a masked 2^32 fix-up). Measured
// (A/B in one process, 4.5M values, 1 thread, min of 15): neither double(int32(w ^ 2^31)) + 2^31 nor the
// exact magic-number form double_of(2^52 | w) - 2^52 was faster (within +-3%); Box-Muller is bound by
// its ~130 float64 operations per 8 pairs, not by the conversions.
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

// The 16 output words of block lo32 = ctr, hi32 = n0 from the state after the first column round, whose
// words 1-3, 5-7, 9-11 and 13-15 are passed in (they do not depend on the counter when n0 is fixed).
#define PYUNLEARN_CHACHA_LANE(OUT, L, CTR, N0, P1, P2, P3, P5, P6, P7, P9, P10, P11, P13, P14, P15)      \
  {                                                                                                   \
    uint32_t x0 = 0x61707865u, x4 = k0, x8 = k4, x12 = (CTR);                                         \
    PYUNLEARN_QR(x0, x4, x8, x12);                                                                    \
    uint32_t x1 = (P1), x2 = (P2), x3 = (P3), x5 = (P5), x6 = (P6), x7 = (P7), x9 = (P9), x10 = (P10),  \
             x11 = (P11), x13 = (P13), x14 = (P14), x15 = (P15);                                      \
    PYUNLEARN_QR(x0, x5, x10, x15);                                                                   \
    PYUNLEARN_QR(x1, x6, x11, x12);                                                                   \
    PYUNLEARN_QR(x2, x7, x8, x13);                                                                    \
    PYUNLEARN_QR(x3, x4, x9, x14);                                                                    \
    _Pragma("GCC unroll 9") for (int r = 1; r < 10; ++r) {                                            \
      PYUNLEARN_QR(x0, x4, x8, x12);                                                                  \
      PYUNLEARN_QR(x1, x5, x9, x13);                                                                  \
      PYUNLEARN_QR(x2, x6, x10, x14);                                                                 \
      PYUNLEARN_QR(x3, x7, x11, x15);                                                                 \
      PYUNLEARN_QR(x0, x5, x10, x15);                                                                 \
      PYUNLEARN_QR(x1, x6, x11, x12);                                                                 \
      PYUNLEARN_QR(x2, x7, x8, x13);                                                                  \
      PYUNLEARN_QR(x3, x4, x9, x14);                                                                  \
    }                                                                                                 \
    OUT[0 * stride + L] = x0 + 0x61707865u;                                                           \
    OUT[1 * stride + L] = x1 + 0x3320646eu;                                                           \
    OUT[2 * stride + L] = x2 + 0x79622d32u;                                                           \
    OUT[3 * stride + L] = x3 + 0x6b206574u;                                                           \
    OUT[4 * stride + L] = x4 + k0;                                                                    \
    OUT[5 * stride + L] = x5 + k1;                                                                    \
    OUT[6 * stride + L] = x6 + k2;                                                                    \
    OUT[7 * stride + L] = x7 + k3;                                                                    \
    OUT[8 * stride + L] = x8 + k4;                                                                    \
    OUT[9 * stride + L] = x9 + k5;                                                                    \
    OUT[10 * stride + L] = x10 + k6;                                                                  \
    OUT[11 * stride + L] = x11 + k7;                                                                  \
    OUT[12 * stride + L] = x12 + (CTR);                                                               \
    OUT[13 * stride + L] = x13 + (N0);                                                                \
    OUT[14 * stride + L] = x14 + n1;                                                                  \
    OUT[15 * stride + L] = x15 + n2;                                                                  \
  }

// NOTE (measured on the 2-core Xeon (Sapphire Rapids) dev box, 4.5M values = 1.125M blocks, 1 thread,
// CPU time): one 16-lane group per inner loop keeps the 16 state vectors in the 32 zmm registers
// (vprold does the rotations): ~12 ms, ~0.45 cycle/byte of keystream, about half of the noise time. The
// AVX2 clone (shift/shift/or rotations, 16 registers) takes ~34 ms, and AVX-512 at 256-bit width
// (-mprefer-vector-width=256) ~23 ms (vprold has a single port). The unrolled rounds are straight-line
// code, so the lane loop is what GCC vectorises. Three of the four quarter rounds of the first column
// round do not depend on the block counter when its high word is the same for all blocks of the call
// (always, except across a multiple of 2^32 blocks): they are computed once per call (3.75% of the
// rounds; measured 1-2% faster, GCC already hoisted part of them).
PYUNLEARN_CLONES PYUNLEARN_FLATTEN void chacha20_groups(const NoiseKey& key, uint64_t b0, int64_t ngroups,
                                                        uint32_t* __restrict w) {
  constexpr int64_t stride = kNoiseMaxBlocks;
  const uint32_t k0 = key.k[0], k1 = key.k[1], k2 = key.k[2], k3 = key.k[3], k4 = key.k[4], k5 = key.k[5],
                 k6 = key.k[6], k7 = key.k[7];
  const uint32_t n1 = key.step, n2 = key.stream;
  const uint32_t lo0 = static_cast<uint32_t>(b0), hi0 = static_cast<uint32_t>(b0 >> 32);
  const uint64_t count = static_cast<uint64_t>(ngroups * kNoiseGroup);
  if (static_cast<uint64_t>(lo0) + count <= (uint64_t{1} << 32)) {
    // The high word is hi0 for every block: hoist the counter-free quarter rounds.
    uint32_t p1 = 0x3320646eu, p5 = k1, p9 = k5, p13 = hi0;
    uint32_t p2 = 0x79622d32u, p6 = k2, p10 = k6, p14 = n1;
    uint32_t p3 = 0x6b206574u, p7 = k3, p11 = k7, p15 = n2;
    PYUNLEARN_QR(p1, p5, p9, p13);
    PYUNLEARN_QR(p2, p6, p10, p14);
    PYUNLEARN_QR(p3, p7, p11, p15);
    for (int64_t gi = 0; gi < ngroups; ++gi) {
      uint32_t* __restrict out = w + gi * kNoiseGroup;
      const uint32_t jbase = lo0 + static_cast<uint32_t>(gi * kNoiseGroup);
      for (uint32_t l = 0; l < static_cast<uint32_t>(kNoiseGroup); ++l) {
        PYUNLEARN_CHACHA_LANE(out, l, jbase + l, hi0, p1, p2, p3, p5, p6, p7, p9, p10, p11, p13, p14, p15)
      }
    }
    return;
  }
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    uint32_t* __restrict out = w + gi * kNoiseGroup;
    const uint32_t jbase = static_cast<uint32_t>(gi * kNoiseGroup);
    for (uint32_t l = 0; l < static_cast<uint32_t>(kNoiseGroup); ++l) {
      const uint32_t ctr = lo0 + (jbase + l);
      const uint32_t n0 = hi0 + (ctr < lo0 ? 1u : 0u);  // carry into the high word (at most one wrap)
      uint32_t p1 = 0x3320646eu, p5 = k1, p9 = k5, p13 = n0;
      uint32_t p2 = 0x79622d32u, p6 = k2, p10 = k6, p14 = n1;
      uint32_t p3 = 0x6b206574u, p7 = k3, p11 = k7, p15 = n2;
      PYUNLEARN_QR(p1, p5, p9, p13);
      PYUNLEARN_QR(p2, p6, p10, p14);
      PYUNLEARN_QR(p3, p7, p11, p15);
      PYUNLEARN_CHACHA_LANE(out, l, ctr, n0, p1, p2, p3, p5, p6, p7, p9, p10, p11, p13, p14, p15)
    }
  }
}

#undef PYUNLEARN_CHACHA_LANE
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

// NOTE (measured, 4.5M values, 1 thread, AVX-512 clone, CPU time): ChaCha20 ~12 ms, radius loop ~6.5 ms,
// angle loop ~5.5 ms, interleave ~0.6 ms: ~25-27 ms, ~5.8 ns a value, ~1.4 GB/s of float64 noise. The
// radius and the angle in one loop (more independent chains per iteration) was 4-10% slower (register
// pressure: the polynomial constants and both chains exceed 32 zmm registers); unrolling the loops
// further, or removing the division and square root altogether, changed the time by less than 4%.
// Chunks of 128 blocks keep the words (8 KiB) and the normals (4 KiB) in L1.
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
  const uint64_t end = first + static_cast<uint64_t>(n);
  uint64_t e = first;
  while (e < end) {
    // Windows of kNoiseMaxBlocks blocks aligned in global index; whole windows go straight to out.
    const uint64_t b0 = e / 4;
    const uint64_t window_end = (b0 / kNoiseMaxBlocks + 1) * kNoiseMaxBlocks * 4;
    const uint64_t stop = std::min(end, window_end);
    const int64_t nb = static_cast<int64_t>((stop - 1) / 4 - b0 + 1);
    double* dst = out + (e - first);
    if (e == 4 * b0 && stop == 4 * (b0 + static_cast<uint64_t>(nb))) {
      normals_of_blocks(key, b0, nb, dst);
    } else {
      normals_of_blocks(key, b0, nb, buf);
      std::copy(buf + (e - 4 * b0), buf + (stop - 4 * b0), dst);
    }
    e = stop;
  }
}

}  // namespace pyunlearn

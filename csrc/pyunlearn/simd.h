// Portable helpers for the CPU kernels: function multi-versioning and vectorisable float math.
//
// The hot loops are plain C++ written so that GCC/Clang auto-vectorise them (no library calls in the
// loop bodies: exp/log/sin/cos below are branch-free polynomial implementations). On x86-64 Linux with
// GCC >= 12 every hot function is compiled three times (x86-64-v4 = AVX-512, v3 = AVX2+FMA, baseline)
// and the loader picks the best one for the running CPU (target_clones, via ifunc).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12 && !defined(PYUNLEARN_NO_CLONES)
#define PYUNLEARN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 8 && !defined(PYUNLEARN_NO_CLONES)
#define PYUNLEARN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYUNLEARN_CLONES
#endif

// Inline every call inside a cloned function, so helper templates are compiled for each target too
// (a helper GCC decides not to inline would otherwise exist only in its baseline version).
#if defined(__GNUC__)
#define PYUNLEARN_FLATTEN __attribute__((flatten))
#else
#define PYUNLEARN_FLATTEN
#endif

namespace pyunlearn {
namespace simd {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Natural logarithm of a positive *normal* float, evaluated in double (about 1e-16 relative error),
// so the float rounding of the result is correct except in rare near-ties.
//   x = m 2^e, m in [sqrt(1/2), sqrt(2));  log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.1716.
inline double log_positive(float x) {
  const uint32_t b = bits_of(x);
  int32_t e = static_cast<int32_t>(b >> 23) - 127;
  float m = float_of((b & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  const float half = 0.5f * m;  // exact; computed unconditionally so that loops if-convert
  m = big ? half : m;
  e = big ? e + 1 : e;
  const double f = static_cast<double>(m) - 1.0;
  const double s = f / (2.0 + f);
  const double s2 = s * s;
  // Series of atanh truncated after s^13: remainder < s2^7 / 15 < 2e-12 relative.
  double p = 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  return static_cast<double>(e) * 0.6931471805599453094 + 2.0 * s * p;
}

// exp(x) for x <= 0 (NaN propagates), Cephes expf: Cody-Waite reduction by ln 2 and a degree-6
// polynomial, about 1 ulp. Results below the smallest normal float (x < -87.33) flush to 0.
inline float exp_nonpositive(float x) {
  const float xc = x < -88.0f ? -88.0f : x;  // NaN compares false and passes through
  const float t = xc * 1.44269504088896341f;
  const float magic = 12582912.0f;             // 1.5 * 2^23: (t + magic) - magic rounds t
  const float k = (t + magic) - magic;
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const float scale = float_of(static_cast<uint32_t>(ki + 127) << 23);
  const float y = p * scale;
  return x < -87.33654f ? 0.0f : y;
}

// log(1 + e) for e in [0, 1] with full relative accuracy (Goldberg: log(d) * e / (d - 1), d = 1 + e).
inline float log1p_unit(float e) {
  const float d = 1.0f + e;
  const double l = log_positive(d);
  const float dm1 = d - 1.0f;
  const double ratio = static_cast<double>(e) / static_cast<double>(dm1 == 0.0f ? 1.0f : dm1);
  const float r = static_cast<float>(l * ratio);
  return dm1 == 0.0f ? e : r;
}

}  // namespace simd
}  // namespace pyunlearn

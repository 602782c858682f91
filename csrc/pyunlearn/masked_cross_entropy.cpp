// Masked pixel cross-entropy, forward and backward in one pass over the logits.
//
// Work is split into tasks (sample b, block of P pixels); P depends on K only. A task loads its K x P
// logits once into an L1-resident float32 (float64 for float64 logits) scratch tile, computes the
// per-pixel max, exp, sum, loss and gradient there, and writes the gradient once. Each task leaves one
// loss partial; partials are summed per sample in block order (in double), so the loss is
// bit-identical for any thread count. No atomics.
//
// Differences from the reference that only show on non-finite inputs: masked-out pixels contribute an
// exact 0 to the loss and gradient (the reference multiplies by 0, so inf/NaN logits there give NaN).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace pyunlearn {

namespace {

// Pixels per task: the K x P scratch tile stays within 32 KiB (float32) and P is a multiple of 16.
int64_t pixels_per_block(int64_t K) {
  const int64_t p = (8192 / std::max<int64_t>(K, 1)) & ~int64_t{15};
  return std::clamp<int64_t>(p, 16, 512);
}

inline float exp_np(float x) { return simd::exp_nonpositive(x); }
inline double exp_np(double x) { return std::exp(x); }
inline float log_pos(float x) { return static_cast<float>(simd::log_positive(x)); }
inline double log_pos(double x) { return std::log(x); }
inline float log1p_u(float e) { return simd::log1p_unit(e); }
inline double log1p_u(double e) { return std::log1p(e); }

// Sum in a fixed order with 16 independent lanes: vectorises (an in-order float reduction would not)
// and does not depend on the thread count.
template <typename acc_t>
inline acc_t lane_sum(const acc_t* __restrict v, int64_t len) {
  acc_t acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += v[i + l];
  }
  for (int l = 0; i + l < len; ++l) acc[l] += v[i + l];
  for (int w = 8; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// Softmax cross-entropy on a tile. S: K x P logits in acc_t (overwritten), t: targets clamped to
// [0, K), w: per-pixel scale (0 where the mask is off). Overwrites S with the gradient tile and
// returns sum_j w_j * loss_j.
template <typename acc_t>
inline acc_t softmax_tile(acc_t* __restrict S, int64_t K, int64_t P, int64_t len, const int32_t* __restrict t,
                          const acc_t* __restrict w, acc_t* __restrict mx, acc_t* __restrict sum,
                          acc_t* __restrict xt) {
  for (int64_t j = 0; j < len; ++j) {
    mx[j] = S[j];
    xt[j] = S[j];
  }
  for (int64_t k = 1; k < K; ++k) {  // max and target logit by selects (vectorises; no gather)
    const acc_t* __restrict row = S + k * P;
    for (int64_t j = 0; j < len; ++j) {
      mx[j] = row[j] > mx[j] ? row[j] : mx[j];
      xt[j] = t[j] == static_cast<int32_t>(k) ? row[j] : xt[j];
    }
  }
  for (int64_t j = 0; j < len; ++j) sum[j] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    acc_t* __restrict row = S + k * P;
    for (int64_t j = 0; j < len; ++j) {
      const acc_t e = exp_np(row[j] - mx[j]);
      row[j] = e;
      sum[j] += e;
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    // Operations are computed unconditionally and then selected (no conditional FP operation), so
    // the loop if-converts and vectorises.
    const acc_t pixel = log_pos(sum[j]) - (xt[j] - mx[j]);
    const acc_t weighted = pixel * w[j];
    const acc_t ratio = w[j] / sum[j];
    xt[j] = w[j] != acc_t(0) ? weighted : acc_t(0);  // now: weighted pixel loss
    sum[j] = ratio;                                  // now: scale / sum
  }
  const acc_t loss = lane_sum(xt, len);
  for (int64_t k = 0; k < K; ++k) {
    acc_t* __restrict row = S + k * P;
    for (int64_t j = 0; j < len; ++j) {
      // (softmax - onehot) * scale, as the reference: (p - [k == t]) * w
      const acc_t p = row[j] * sum[j];
      const acc_t q = p - w[j];
      row[j] = t[j] == static_cast<int32_t>(k) ? q : p;
    }
  }
  return loss;
}

// Binary cross-entropy with logits on a tile (K == 1): y = target value.
template <typename acc_t>
inline acc_t sigmoid_tile(acc_t* __restrict S, int64_t len, const int32_t* __restrict t,
                          const acc_t* __restrict w, acc_t* __restrict pl) {
  for (int64_t j = 0; j < len; ++j) {
    const acc_t z = S[j];
    const acc_t y = static_cast<acc_t>(t[j]);
    const acc_t neg = -z;
    const acc_t az = z < acc_t(0) ? neg : z;
    const acc_t e = exp_np(-az);
    const acc_t zy = z * y;
    const acc_t pixel = (z > acc_t(0) ? z : acc_t(0)) - zy + log1p_u(e);
    const acc_t inv = acc_t(1) / (acc_t(1) + e);
    const acc_t e_inv = e * inv;
    const acc_t sig = z >= acc_t(0) ? inv : e_inv;
    const acc_t weighted = pixel * w[j];
    pl[j] = w[j] != acc_t(0) ? weighted : acc_t(0);
    S[j] = (sig - y) * w[j];
  }
  return lane_sum(pl, len);
}

template <typename scalar_t, typename acc_t>
struct Tile {
  const MaskedCEArgs& a;
  int64_t P;

  // One task: sample b, pixels [n0, n0 + len). Returns the loss partial; counts bad targets.
  acc_t run(int64_t b, int64_t n0, int64_t len, acc_t scale, acc_t* S, acc_t* aux, int32_t* t,
            int64_t& bad) const {
    const int64_t K = a.K, N = a.N;
    // The mask as bytes: GCC vectorises uint8 loads, not bool ones.
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(a.mask) + b * N + n0;
    scalar_t* grad = static_cast<scalar_t*>(a.grad) + b * K * N + n0;
    acc_t* w = aux;
    int64_t active = 0;
    for (int64_t j = 0; j < len; ++j) {
      const uint8_t on = mask[j];
      w[j] = on != 0 ? scale : acc_t(0);
      active += on != 0 ? 1 : 0;
    }
    load_targets(b, n0, len, t);
    if (K >= 2) {
      for (int64_t j = 0; j < len; ++j) {
        const bool ok = t[j] >= 0 && t[j] < K;
        bad += ok ? 0 : 1;
        t[j] = ok ? t[j] : 0;
      }
    }
    if (active == 0) {  // nothing to compute: zero gradient, zero loss
      for (int64_t k = 0; k < K; ++k) std::fill(grad + k * N, grad + k * N + len, scalar_t(0));
      return acc_t(0);
    }
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + b * a.sb + n0 * a.sn;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* xk = x + k * a.sk;
      acc_t* row = S + k * P;
      if (a.sn == 1) {
        for (int64_t j = 0; j < len; ++j) row[j] = static_cast<acc_t>(xk[j]);
      } else {
        for (int64_t j = 0; j < len; ++j) row[j] = static_cast<acc_t>(xk[j * a.sn]);
      }
    }
    const acc_t loss = K == 1 ? sigmoid_tile<acc_t>(S, len, t, w, aux + P)
                              : softmax_tile<acc_t>(S, K, P, len, t, w, aux + P, aux + 2 * P, aux + 3 * P);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* row = S + k * P;
      scalar_t* gk = grad + k * N;
      for (int64_t j = 0; j < len; ++j) gk[j] = static_cast<scalar_t>(row[j]);
    }
    return loss;
  }

  void load_targets(int64_t b, int64_t n0, int64_t len, int32_t* t) const {
    const int64_t off = b * a.N + n0;
    switch (a.target_type) {
      case IndexType::kInt64: {
        const int64_t* src = static_cast<const int64_t*>(a.target) + off;
        // Clamp into int32 so that out-of-range int64 values stay out of range.
        for (int64_t j = 0; j < len; ++j) {
          const int64_t v = src[j];
          t[j] = v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : static_cast<int32_t>(v));
        }
        break;
      }
      case IndexType::kInt32: {
        const int32_t* src = static_cast<const int32_t*>(a.target) + off;
        for (int64_t j = 0; j < len; ++j) t[j] = src[j];
        break;
      }
      case IndexType::kUInt8: {
        const uint8_t* src = static_cast<const uint8_t*>(a.target) + off;
        for (int64_t j = 0; j < len; ++j) t[j] = src[j];
        break;
      }
    }
  }
};

// Runs tasks [lo, hi) for one dtype: the clone-dispatched hot function.
template <typename scalar_t, typename acc_t>
inline void run_tasks(const MaskedCEArgs& a, int64_t P, int64_t nblk, const acc_t* scale, int64_t lo,
                      int64_t hi, acc_t* partial, int64_t* bad) {
  std::vector<acc_t> S(static_cast<size_t>(a.K * P)), aux(static_cast<size_t>(4 * P));
  std::vector<int32_t> t(static_cast<size_t>(P));
  const Tile<scalar_t, acc_t> tile{a, P};
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / nblk, n0 = (task % nblk) * P;
    const int64_t len = std::min(P, a.N - n0);
    int64_t nbad = 0;
    partial[task] = tile.run(b, n0, len, scale[b], S.data(), aux.data(), t.data(), nbad);
    bad[task] = nbad;
  }
}

#define PYUNLEARN_RUN_TASKS(NAME, SCALAR, ACC)                                                        \
  PYUNLEARN_CLONES PYUNLEARN_FLATTEN void NAME(const MaskedCEArgs& a, int64_t P, int64_t nblk, const ACC* scale,        \
                             int64_t lo, int64_t hi, ACC* partial, int64_t* bad) {                    \
    run_tasks<SCALAR, ACC>(a, P, nblk, scale, lo, hi, partial, bad);                                \
  }
PYUNLEARN_RUN_TASKS(tasks_f32, float, float)
PYUNLEARN_RUN_TASKS(tasks_bf16, c10::BFloat16, float)
PYUNLEARN_RUN_TASKS(tasks_f16, c10::Half, float)
PYUNLEARN_RUN_TASKS(tasks_f64, double, double)
#undef PYUNLEARN_RUN_TASKS

template <typename acc_t>
int64_t launch(const MaskedCEArgs& a,
               void (*tasks)(const MaskedCEArgs&, int64_t, int64_t, const acc_t*, int64_t, int64_t, acc_t*,
                             int64_t*)) {
  const int64_t B = a.B, N = a.N;
  // Per-sample scale, as the reference: fl(1 / max(count, 1)) [* weight], in acc_t.
  std::vector<acc_t> scale(static_cast<size_t>(B));
  const int64_t count_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(N, 1));
  at::parallel_for(0, B, count_grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(a.mask) + b * N;
      int64_t count = 0;
      for (int64_t n = 0; n < N; ++n) count += m[n] != 0 ? 1 : 0;
      acc_t s = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(count, 1));
      if (a.weight != nullptr) s = s * static_cast<const acc_t*>(a.weight)[b];
      scale[b] = s;
    }
  });
  const int64_t P = pixels_per_block(a.K);
  const int64_t nblk = (N + P - 1) / P;
  const int64_t ntask = B * nblk;
  std::vector<acc_t> partial(static_cast<size_t>(ntask), acc_t(0));
  std::vector<int64_t> bad(static_cast<size_t>(ntask), 0);
  if (ntask > 0) {
    // At least ~32K logits per thread: small problems run on one thread (no fork/join cost).
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (P * a.K));
    at::parallel_for(0, ntask, grain, [&](int64_t lo, int64_t hi) {
      tasks(a, P, nblk, scale.data(), lo, hi, partial.data(), bad.data());
    });
  }
  acc_t* loss = static_cast<acc_t*>(a.loss);
  int64_t nbad = 0;
  for (int64_t b = 0; b < B; ++b) {
    double total = 0.0;
    for (int64_t i = 0; i < nblk; ++i) total += static_cast<double>(partial[b * nblk + i]);
    loss[b] = static_cast<acc_t>(total);
  }
  for (int64_t v : bad) nbad += v;
  return nbad;
}

}  // namespace

int64_t masked_cross_entropy(const MaskedCEArgs& a) {
  switch (a.dtype) {
    case FloatType::kFloat32:
      return launch<float>(a, tasks_f32);
    case FloatType::kBFloat16:
      return launch<float>(a, tasks_bf16);
    case FloatType::kFloat16:
      return launch<float>(a, tasks_f16);
    case FloatType::kFloat64:
      return launch<double>(a, tasks_f64);
  }
  return 0;
}

}  // namespace pyunlearn

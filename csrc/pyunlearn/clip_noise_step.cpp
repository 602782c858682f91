// Multi-tensor clip + noise + update, and the keyed fingerprint: one call for all parameter tensors.
//
// Every pass runs over fixed blocks of <= kBlock elements that never span two tensors, in parallel
// (at::parallel_for = OpenMP here); per-block partial sums are reduced in block order in double, so
// results are bit-identical for any thread count. Noise and fingerprint weights use the global element
// index (tensor offset in the concatenation + index), so they do not depend on how parameters are split.
//
// Reductions (all fixed, all deterministic):
//   * sums of squares of float32 values (gradient norm, |y| of model clipping, global_norm): 16 float
//     lanes per 1024-element sub-block (lane = offset in the sub-block mod 16), lanes folded by a fixed
//     tree, the sub-block sums added in double;
//   * the fingerprint [sum w_i x_i, sum x_i^2]: 16 double lanes, lane = global index mod 16, each lane in
//     index order over the whole block, folded by the same tree at the end of the block. Pass 1, the
//     standalone fingerprint and the fingerprint of the new values formed in pass 2 (as they are written,
//     chunk by chunk) therefore give the same doubles for the same values.
//
// FMA contraction is off in this file: each element-wise operation rounds exactly like the separate
// PyTorch ops of the reference (pyunlearn/ops/reference.py), bit for bit for the same clip factor.
#include <ATen/Parallel.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <atomic>
#include <vector>

#include "kernels.h"
#include "simd.h"

#if defined(__GNUC__)
#define PYUNLEARN_INLINE inline __attribute__((always_inline))
#else
#define PYUNLEARN_INLINE inline
#endif

namespace pyunlearn {

namespace {

// 32K-element blocks (128 KiB of params + 128 KiB of grads stay in L2 while their chunks are processed)
// give ~140 blocks at 4.5M parameters, plenty for load balance on a few threads.
constexpr int64_t kBlock = 1 << 15;
constexpr int64_t kSub = 1024;  // float32 partial sums over 1024 elements, double above
// Noise is generated for aligned windows of kChunk global elements (128 ChaCha20 blocks: 8 KiB of words,
// 4 KiB of normals, all in L1 with the chunk's params and grads).
constexpr int64_t kChunk = 4 * kNoiseMaxBlocks;
constexpr int kLanes = 16;

struct Block {
  int32_t span;
  int64_t begin, end;
};

std::vector<Block> make_blocks(const std::vector<ParamSpan>& spans) {
  std::vector<Block> blocks;
  for (size_t s = 0; s < spans.size(); ++s) {
    for (int64_t b = 0; b < spans[s].n; b += kBlock) {
      blocks.push_back(Block{static_cast<int32_t>(s), b, std::min(spans[s].n, b + kBlock)});
    }
  }
  return blocks;
}

// Problems below ~64K elements run on one thread (no fork/join cost).
bool run_serially(const std::vector<Block>& blocks) {
  int64_t total = 0;
  for (const Block& b : blocks) total += b.end - b.begin;
  return total < (int64_t{1} << 16) || blocks.size() < 2;
}

// ------------------------------------------------------------------------------- fingerprint lanes
struct FpLanes {
  double p[kLanes];
  double s[kLanes];
};

PYUNLEARN_INLINE void fp_clear(FpLanes& a) {
  for (int l = 0; l < kLanes; ++l) {
    a.p[l] = 0.0;
    a.s[l] = 0.0;
  }
}

PYUNLEARN_INLINE Fingerprint fp_fold(FpLanes& a) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) {
      a.p[l] += a.p[l + w];
      a.s[l] += a.s[l + w];
    }
  }
  return Fingerprint{a.p[0], a.s[0]};
}

// fingerprint_weight of chacha.h from the two halves of the global index.
PYUNLEARN_INLINE double fp_weight(uint32_t lo, uint32_t hi, FpKey k) {
  const uint32_t h = fmix32(fmix32(lo ^ k.k0) ^ hi ^ k.k1);
  return static_cast<double>(static_cast<int32_t>(h) >> 8) * 1.1920928955078125e-07;  // 2^-23
}

PYUNLEARN_INLINE void fp_add(FpLanes& a, int l, uint64_t index, float v, FpKey k) {
  const double w = fp_weight(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), k);
  const double d = static_cast<double>(v);
  a.p[l] += w * d;  // exact product (24-bit weight times a float)
  a.s[l] += d * d;  // exact square
}

// Calls op(i) for i = 0 .. n-1 in order (op writes element i and returns the value written) and, when
// kFp, adds the values to the lanes, element first + i going to lane (first + i) mod 16. The loop over
// whole 16-element groups aligned in global index is the one that vectorises.
template <bool kFp, class Op>
PYUNLEARN_INLINE void for_each_lane(int64_t n, uint64_t first, FpLanes& acc, FpKey key, Op op) {
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((kLanes - (first & (kLanes - 1))) & (kLanes - 1)));
  for (; i < head; ++i) {
    const float v = op(i);
    if (kFp) fp_add(acc, static_cast<int>((first + i) & (kLanes - 1)), first + static_cast<uint64_t>(i), v, key);
  }
  for (; i + kLanes <= n; i += kLanes) {
    const uint64_t g = first + static_cast<uint64_t>(i);  // a multiple of 16: lo + l never wraps
    const uint32_t lo = static_cast<uint32_t>(g), hi = static_cast<uint32_t>(g >> 32);
    for (int l = 0; l < kLanes; ++l) {
      const float v = op(i + l);
      if (kFp) {
        const double w = fp_weight(lo + static_cast<uint32_t>(l), hi, key);
        const double d = static_cast<double>(v);
        acc.p[l] += w * d;
        acc.s[l] += d * d;
      }
    }
  }
  for (; i < n; ++i) {
    const float v = op(i);
    if (kFp) fp_add(acc, static_cast<int>((first + i) & (kLanes - 1)), first + static_cast<uint64_t>(i), v, key);
  }
}

// ------------------------------------------------------------------------------- sums of squares
// Sum of squares of value(i), i < n, with 16 float lanes per kSub sub-block (same result on every clone).
template <class Value>
PYUNLEARN_INLINE double sumsq_of(int64_t n, Value value) {
  double total = 0.0;
  for (int64_t s = 0; s < n; s += kSub) {
    const int64_t len = std::min(kSub, n - s);
    float acc[kLanes] = {0.f};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = value(s + i + l);
        acc[l] += v * v;
      }
    }
    for (int l = 0; i + l < len; ++l) {
      const float v = value(s + i + l);
      acc[l] += v * v;
    }
    for (int w = kLanes / 2; w >= 1; w /= 2) {
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    }
    total += static_cast<double>(acc[0]);
  }
  return total;
}

PYUNLEARN_CLONES PYUNLEARN_FLATTEN double sumsq_block(const float* __restrict v, int64_t n) {
  return sumsq_of(n, [&](int64_t i) { return v[i]; });
}

PYUNLEARN_CLONES PYUNLEARN_FLATTEN Fingerprint fingerprint_block(const float* __restrict x, int64_t n, uint64_t first,
                                                                 FpKey key) {
  FpLanes acc;
  fp_clear(acc);
  for_each_lane<true>(n, first, acc, key, [&](int64_t i) { return x[i]; });
  return fp_fold(acc);
}

// Pass 1 of one block: sum of squares of g (kGrads) or of y = x - lr (g + wd x) (kModelUpdate), sub-block
// by sub-block, and the fingerprint of x over the same sub-block while it is in L1.
PYUNLEARN_CLONES PYUNLEARN_FLATTEN double read_block(NormOf of, float lr, float wd, const float* __restrict x,
                                                     const float* __restrict g, int64_t n, uint64_t first, FpKey key,
                                                     Fingerprint& fp) {
  FpLanes acc;
  fp_clear(acc);
  double total = 0.0;
  for (int64_t s = 0; s < n; s += kSub) {
    const int64_t len = std::min(kSub, n - s);
    const float* __restrict xs = x + s;
    const float* __restrict gs = g + s;
    if (of == NormOf::kGrads) {
      total += sumsq_of(len, [&](int64_t i) { return gs[i]; });
    } else {
      // reference: y = p - (lr * (g + wd * p))
      total += sumsq_of(len, [&](int64_t i) { return xs[i] - lr * (gs[i] + wd * xs[i]); });
    }
    for_each_lane<true>(len, first + static_cast<uint64_t>(s), acc, key, [&](int64_t i) { return xs[i]; });
  }
  fp = fp_fold(acc);
  return total;
}

// ------------------------------------------------------------------------------- update pass
// One element-wise pass over x[0..n) (global indices first .. first + n - 1), noise generated per aligned
// window of kChunk global elements. Returns the fingerprint of the written values (if want_fp).
template <StepKind kKind, bool kNoisy, bool kFp>
PYUNLEARN_INLINE Fingerprint update_block_impl(const StepArgs& a, float* __restrict x, const float* __restrict g,
                                               int64_t n, uint64_t first) {
  const float lr = a.lr, f = a.factor, wd = a.wd;
  const double lr_d = a.lr_d, wd_d = a.wd_d, ebs = a.ebs, sg = a.sigma;
  const ReleaseGrid grid = a.grid;
  const FpKey key = a.fp;
  alignas(64) double zbuf[4 * kNoiseMaxBlocks];
  FpLanes acc;
  if (kFp) fp_clear(acc);
  int64_t c = 0;
  while (c < n) {
    const uint64_t g0 = first + static_cast<uint64_t>(c);
    const int64_t len = std::min<int64_t>(n - c, static_cast<int64_t>(kChunk - (g0 % kChunk)));
    const double* __restrict z = zbuf;
    if (kNoisy) {
      const uint64_t b0 = g0 / 4;
      const int64_t nb = static_cast<int64_t>((g0 + static_cast<uint64_t>(len) - 1) / 4 - b0 + 1);
      normals_of_blocks(a.key, b0, nb, zbuf);
      z = zbuf + (g0 - 4 * b0);
    }
    float* __restrict xc = x + c;
    const float* __restrict gc = g == nullptr ? nullptr : g + c;
    for_each_lane<kFp>(len, g0, acc, key, [&](int64_t i) -> float {
      float v;
      if (kKind == StepKind::kGradClip) {
        // reference: p -= lr * (g * factor + wd * p); p <- round(p + sigma z) in double
        const float cv = xc[i] - lr * (gc[i] * f + wd * xc[i]);
        v = kNoisy ? release32(static_cast<double>(cv) + sg * z[i], grid) : cv;
      } else if (kKind == StepKind::kModelClip) {
        // reference: y = p - lr * (g + wd * p); p <- y * factor; p <- round(p + sigma z) in double
        const float y = xc[i] - lr * (gc[i] + wd * xc[i]);
        const float cv = y * f;
        v = kNoisy ? release32(static_cast<double>(cv) + sg * z[i], grid) : cv;
      } else if (kKind == StepKind::kDpsgd) {
        // reference (double): x - lr * ((g + std z) / ebs + wd x), rounded once
        const double xd = static_cast<double>(xc[i]);
        const double nd = kNoisy ? static_cast<double>(gc[i]) + sg * z[i] : static_cast<double>(gc[i]);
        v = release32(xd - lr_d * (nd / ebs + wd_d * xd), grid);
      } else {
        v = kNoisy ? release32(static_cast<double>(xc[i]) + sg * z[i], grid) : xc[i];
      }
      xc[i] = v;
      return v;
    });
    c += len;
  }
  return kFp ? fp_fold(acc) : Fingerprint{};
}

template <StepKind kKind>
PYUNLEARN_INLINE Fingerprint update_kind(const StepArgs& a, float* x, const float* g, int64_t n, uint64_t first) {
  const bool noisy = a.sigma != 0.0;
  if (a.want_fp) {
    return noisy ? update_block_impl<kKind, true, true>(a, x, g, n, first)
                 : update_block_impl<kKind, false, true>(a, x, g, n, first);
  }
  return noisy ? update_block_impl<kKind, true, false>(a, x, g, n, first)
               : update_block_impl<kKind, false, false>(a, x, g, n, first);
}

PYUNLEARN_CLONES PYUNLEARN_FLATTEN Fingerprint update_block(StepKind kind, const StepArgs& a, float* x, const float* g,
                                                            int64_t n, uint64_t first) {
  switch (kind) {
    case StepKind::kGradClip: return update_kind<StepKind::kGradClip>(a, x, g, n, first);
    case StepKind::kModelClip: return update_kind<StepKind::kModelClip>(a, x, g, n, first);
    case StepKind::kDpsgd: return update_kind<StepKind::kDpsgd>(a, x, g, n, first);
    case StepKind::kNoise: break;
  }
  return update_kind<StepKind::kNoise>(a, x, g, n, first);
}

// Runs body(block index, block, span) for every block, in parallel. NOTE: blocks are handed out one at
// a time from a shared counter instead of in fixed contiguous ranges, so a thread that loses its core
// for a while (the 2-core dev box is shared) does not hold the other one up. Measured there under load
// (load average ~2, 2 threads, A/B in one process, min of 15 wall times): steps 3-13% faster than with
// static ranges. Each block writes only its own partial sums, reduced in block order afterwards, so
// results do not depend on which thread ran which block.
template <class Body>
void for_blocks(const std::vector<ParamSpan>& spans, const std::vector<Block>& blocks, Body body) {
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  if (run_serially(blocks) || at::get_num_threads() < 2 || at::in_parallel_region()) {
    for (int64_t b = 0; b < nblocks; ++b) body(b, blocks[b], spans[blocks[b].span]);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nblocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < nblocks;
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      body(b, blocks[b], spans[blocks[b].span]);
    }
  });
}

}  // namespace

double sum_squares(const std::vector<ParamSpan>& spans, bool of_grads) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<double> partial(blocks.size(), 0.0);
  for_blocks(spans, blocks, [&](int64_t b, const Block& blk, const ParamSpan& sp) {
    const float* v = of_grads ? sp.g : sp.x;
    partial[b] = sumsq_block(v + blk.begin, blk.end - blk.begin);
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

Fingerprint fingerprint(const std::vector<ParamSpan>& spans, FpKey key) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<Fingerprint> partial(blocks.size());
  for_blocks(spans, blocks, [&](int64_t b, const Block& blk, const ParamSpan& sp) {
    partial[b] = fingerprint_block(sp.x + blk.begin, blk.end - blk.begin, sp.first + static_cast<uint64_t>(blk.begin),
                                   key);
  });
  Fingerprint total;
  for (const Fingerprint& p : partial) {
    total.proj += p.proj;
    total.sq += p.sq;
  }
  return total;
}

ReadPass read_pass(const std::vector<ParamSpan>& spans, NormOf of, float lr, float wd, FpKey key) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<double> sums(blocks.size(), 0.0);
  std::vector<Fingerprint> fps(blocks.size());
  for_blocks(spans, blocks, [&](int64_t b, const Block& blk, const ParamSpan& sp) {
    sums[b] = read_block(of, lr, wd, sp.x + blk.begin, sp.g + blk.begin, blk.end - blk.begin,
                         sp.first + static_cast<uint64_t>(blk.begin), key, fps[b]);
  });
  ReadPass out;
  for (size_t b = 0; b < blocks.size(); ++b) {
    out.sumsq += sums[b];
    out.fp.proj += fps[b].proj;
    out.fp.sq += fps[b].sq;
  }
  return out;
}

Fingerprint apply_step(const std::vector<ParamSpan>& spans, StepKind kind, const StepArgs& args) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<Fingerprint> partial(blocks.size());
  for_blocks(spans, blocks, [&](int64_t b, const Block& blk, const ParamSpan& sp) {
    partial[b] = update_block(kind, args, sp.x + blk.begin, sp.g == nullptr ? nullptr : sp.g + blk.begin,
                              blk.end - blk.begin, sp.first + static_cast<uint64_t>(blk.begin));
  });
  Fingerprint total;
  for (const Fingerprint& p : partial) {
    total.proj += p.proj;
    total.sq += p.sq;
  }
  return total;
}

}  // namespace pyunlearn

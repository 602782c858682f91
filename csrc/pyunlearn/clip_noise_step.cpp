// Multi-tensor clip + noise + update: one call for all parameter tensors.
//
// Pass 1 (norm) and pass 2 (update) each run over fixed blocks of <= kBlock elements that never span
// two tensors, in parallel (at::parallel_for = OpenMP here); per-block partial sums are reduced in block
// order in double, so results are bit-identical for any thread count. Noise uses the global element
// index (tensor offset in the concatenation + index), so it does not depend on how parameters are split.
//
// FMA contraction is off in this file: each element-wise operation rounds exactly like the separate
// PyTorch ops of the reference (pyunlearn/ops/reference.py), so sigma = 0 reproduces it bit for bit
// whenever the clip factor is the same.
#include <ATen/Parallel.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace pyunlearn {

namespace {

// 32K-element blocks (128 KiB of params + 128 KiB of grads stay in L2 between the noise chunks) give
// 128 blocks at 4M parameters, plenty for load balance. The pass is noise-bound, not memory-bound:
// NOTE (measured, 1 thread, CPU time, 4M params on the 2-core AMD EPYC dev box): update pass without
// noise ~1.3 ms, the same pass with noise ~11 ms, noise alone ~10 ms (~2.5 ns per value).
constexpr int64_t kBlock = 1 << 15;
constexpr int64_t kSub = 1024;   // float32 partial sums over 1024 elements, double above
constexpr int64_t kChunk = 512;  // noise generated in chunks that stay in L1

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

// Sum of squares with 16 float lanes in a fixed order (vectorises, same result on every clone).
PYUNLEARN_CLONES PYUNLEARN_FLATTEN double sumsq_block(const float* v, int64_t n) {
  double total = 0.0;
  for (int64_t s = 0; s < n; s += kSub) {
    const int64_t len = std::min(kSub, n - s);
    const float* p = v + s;
    float acc[16] = {0.f};
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      for (int l = 0; l < 16; ++l) acc[l] += p[i + l] * p[i + l];
    }
    for (int l = 0; i + l < len; ++l) acc[l] += p[i + l] * p[i + l];
    for (int w = 8; w >= 1; w /= 2) {
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    }
    total += static_cast<double>(acc[0]);
  }
  return total;
}

// One element-wise pass over x[0..n) (global indices first..first+n-1). Returns the sum of squares of
// the written values for kModelUpdate.
PYUNLEARN_CLONES PYUNLEARN_FLATTEN double update_block(StepKind kind, const StepArgs& a, float* x, const float* g,
                                     int64_t n, uint64_t first) {
  const float lr = a.lr, f = a.factor, wd = a.wd, sg = a.sigma, ebs = a.ebs;
  const bool noisy = sg != 0.0f && kind != StepKind::kModelUpdate;
  float z[kChunk];
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    float* __restrict xc = x + c;
    const float* __restrict gc = g == nullptr ? nullptr : g + c;
    if (noisy) normal_range(a.key, first + static_cast<uint64_t>(c), len, z);
    switch (kind) {
      case StepKind::kGradClip:
        // reference: p -= lr * (g * factor + wd * p); p += sigma * z
        if (noisy) {
          for (int64_t i = 0; i < len; ++i) {
            const float y = xc[i] - lr * (gc[i] * f + wd * xc[i]);
            xc[i] = y + sg * z[i];
          }
        } else {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] - lr * (gc[i] * f + wd * xc[i]);
        }
        break;
      case StepKind::kModelUpdate: {
        // reference: p -= lr * (g + wd * p), then the norm of p
        float acc[16] = {0.f};
        int64_t i = 0;
        for (; i + 16 <= len; i += 16) {
          for (int l = 0; l < 16; ++l) {
            const float y = xc[i + l] - lr * (gc[i + l] + wd * xc[i + l]);
            xc[i + l] = y;
            acc[l] += y * y;
          }
        }
        for (int l = 0; i + l < len; ++l) {
          const float y = xc[i + l] - lr * (gc[i + l] + wd * xc[i + l]);
          xc[i + l] = y;
          acc[l] += y * y;
        }
        for (int w = 8; w >= 1; w /= 2) {
          for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
        }
        total += static_cast<double>(acc[0]);
        break;
      }
      case StepKind::kScale:
        // reference: p *= factor; p += sigma * z
        if (noisy) {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] * f + sg * z[i];
        } else if (f != 1.0f) {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] * f;
        }
        break;
      case StepKind::kDpsgd:
        // reference: p -= lr * ((g + std * z) / ebs + wd * p)   (sigma holds std)
        if (noisy) {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] - lr * ((gc[i] + sg * z[i]) / ebs + wd * xc[i]);
        } else {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] - lr * (gc[i] / ebs + wd * xc[i]);
        }
        break;
      case StepKind::kNoise:
        if (noisy) {
          for (int64_t i = 0; i < len; ++i) xc[i] = xc[i] + sg * z[i];
        }
        break;
    }
  }
  return total;
}

// Blocks per thread: problems below ~64K elements run on one thread (no fork/join cost).
int64_t grain_for(const std::vector<Block>& blocks) {
  int64_t total = 0;
  for (const Block& b : blocks) total += b.end - b.begin;
  return total < (int64_t{1} << 16) ? std::max<int64_t>(1, static_cast<int64_t>(blocks.size())) : 1;
}

}  // namespace

double sum_squares(const std::vector<ParamSpan>& spans, bool of_grads) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<double> partial(blocks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), grain_for(blocks), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      const ParamSpan& sp = spans[blk.span];
      const float* v = of_grads ? sp.g : sp.x;
      partial[b] = sumsq_block(v + blk.begin, blk.end - blk.begin);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

double apply_step(const std::vector<ParamSpan>& spans, StepKind kind, const StepArgs& args) {
  const std::vector<Block> blocks = make_blocks(spans);
  std::vector<double> partial(blocks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), grain_for(blocks), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      const ParamSpan& sp = spans[blk.span];
      partial[b] = update_block(kind, args, sp.x + blk.begin, sp.g == nullptr ? nullptr : sp.g + blk.begin,
                                blk.end - blk.begin, sp.first + static_cast<uint64_t>(blk.begin));
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace pyunlearn

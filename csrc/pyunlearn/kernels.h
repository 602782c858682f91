// Pointer-level entry points of the CPU kernels. Only bindings.cpp sees at::Tensor; the kernel files
// include nothing heavier than ATen/Parallel.h, which keeps the compile units small.
#pragma once

#include <cstdint>
#include <vector>

#include "philox.h"

namespace pyunlearn {

// ---------------------------------------------------------------------------------------------------
// Multi-tensor clip + noise + update (clip_noise_step.cpp). float32, contiguous, CPU.
// ---------------------------------------------------------------------------------------------------
struct ParamSpan {
  float* x;        // parameter (updated in place)
  const float* g;  // gradient (may be null for pure noise / norm passes)
  int64_t n;       // number of elements
  uint64_t first;  // global index of x[0] in the concatenation of all parameters (noise counter)
};

// sum_i v_i^2 over all spans, v = g (of_grads) or x. float32 partial sums per 1024 elements, double
// above; blocks are fixed, so the result does not depend on the thread count.
double sum_squares(const std::vector<ParamSpan>& spans, bool of_grads);

enum class StepKind : int {
  kGradClip = 0,    // x <- x - lr (factor g + wd x)            [+ sigma z]
  kModelUpdate = 1, // x <- x - lr (g + wd x), returns sum of squares of the new x (pass 1 of model clip)
  kScale = 2,       // x <- factor x                             [+ sigma z]   (pass 2 of model clip)
  kDpsgd = 3,       // x <- x - lr ((g [+ sigma z]) / ebs + wd x)
  kNoise = 4,       // x <- x + sigma z
};

struct StepArgs {
  float lr = 0.f, factor = 1.f, wd = 0.f, sigma = 0.f, ebs = 1.f;
  NoiseKey key{};
};

// Applies one element-wise pass to every span (parallel over fixed blocks). Returns the sum of squares
// of the written values for kModelUpdate (0 otherwise).
double apply_step(const std::vector<ParamSpan>& spans, StepKind kind, const StepArgs& args);

// ---------------------------------------------------------------------------------------------------
// Masked cross-entropy forward + backward (masked_cross_entropy.cpp).
// ---------------------------------------------------------------------------------------------------
enum class FloatType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };
enum class IndexType : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2 };

struct MaskedCEArgs {
  const void* logits = nullptr;  // (B, K, N) with strides (sb, sk, sn) in elements
  int64_t B = 0, K = 0, N = 0, sb = 0, sk = 0, sn = 0;
  FloatType dtype = FloatType::kFloat32;
  const void* target = nullptr;  // (B, N) contiguous
  IndexType target_type = IndexType::kInt64;
  const bool* mask = nullptr;    // (B, N) contiguous
  const void* weight = nullptr;  // (B,) contiguous, accumulation dtype, or null
  void* loss = nullptr;          // (B,) accumulation dtype (float64 for float64 logits, else float32)
  void* grad = nullptr;          // (B, K, N) contiguous, dtype of logits
};

// Returns the number of pixels whose target is outside [0, K) (K >= 2); 0 on success.
int64_t masked_cross_entropy(const MaskedCEArgs& args);

}  // namespace pyunlearn

// Pointer-level entry points of the CPU kernels. Only bindings.cpp sees at::Tensor; the kernel files
// include nothing heavier than ATen/Parallel.h, which keeps the compile units small.
#pragma once

#include <cmath>  // before chacha.h, which calls sqrt
#include <cstdint>
#include <vector>

#include "chacha.h"

namespace pyunlearn {

// ---------------------------------------------------------------------------------------------------
// ChaCha20 counter-mode noise (noise.cpp): the vectorised twin of chacha.h / pyunlearn.ops.rng.
// ---------------------------------------------------------------------------------------------------
// Noise blocks are generated in groups of kNoiseGroup consecutive blocks (one vector lane each), at
// most kNoiseMaxBlocks at a time.
constexpr int64_t kNoiseGroup = 16;
constexpr int64_t kNoiseMaxBlocks = 128;

// RFC 8439 block function of blocks b0 .. b0 + 16 * ngroups - 1 (counter lo32(b), nonce (hi32(b), step,
// stream)): word k of block b0 + j goes to w[k * kNoiseMaxBlocks + j]. ngroups * 16 <= kNoiseMaxBlocks.
void chacha20_groups(const NoiseKey& key, uint64_t b0, int64_t ngroups, uint32_t* w);

// The 4 * nb standard normals (float64) of blocks b0 .. b0 + nb - 1, nb <= kNoiseMaxBlocks:
// z[4 j + lane] is element 4 (b0 + j) + lane of the noise.
void normals_of_blocks(const NoiseKey& key, uint64_t b0, int64_t nb, double* z);

// Normals of global elements first .. first + n - 1 (any n >= 0, single-threaded).
void normal_range(const NoiseKey& key, uint64_t first, int64_t n, double* out);

// ---------------------------------------------------------------------------------------------------
// Multi-tensor clip + noise + update (clip_noise_step.cpp). float32, contiguous, CPU.
// ---------------------------------------------------------------------------------------------------
struct ParamSpan {
  float* x;        // parameter (updated in place)
  const float* g;  // gradient (may be null for pure noise / norm passes)
  int64_t n;       // number of elements
  uint64_t first;  // global index of x[0] in the concatenation of all parameters (noise and fingerprint)
};

struct FpKey {
  uint32_t k0 = 0, k1 = 0;
};

// Keyed fingerprint [sum_i w_i x_i, sum_i x_i^2] (double; reference.fingerprint). Accumulated in 16
// double lanes, lane = global index mod 16, in index order within each fixed block, lanes combined by
// a fixed tree at the end of the block, blocks summed in order: the same doubles whichever pass forms
// it and for any thread count.
struct Fingerprint {
  double proj = 0.0, sq = 0.0;
};

// sum_i v_i^2 over all spans, v = g (of_grads) or x. float32 partial sums per 1024 elements, double
// above; blocks are fixed, so the result does not depend on the thread count.
double sum_squares(const std::vector<ParamSpan>& spans, bool of_grads);

Fingerprint fingerprint(const std::vector<ParamSpan>& spans, FpKey key);

// Pass 1 of a step (read-only): the sum of squares of the gradients (kGrads) or of the model update
// y = x - lr (g + wd x) (kModelUpdate), with sum_squares' float32/double structure, and the fingerprint
// of the current x.
enum class NormOf : int { kGrads = 0, kModelUpdate = 1 };

struct ReadPass {
  double sumsq = 0.0;
  Fingerprint fp;
};

ReadPass read_pass(const std::vector<ParamSpan>& spans, NormOf of, float lr, float wd, FpKey key);

enum class StepKind : int {
  kGradClip = 0,   // c = x - lr (factor g + wd x) [float32];  x <- round(c + sigma z)       [+ fingerprint]
  kModelClip = 1,  // y = x - lr (g + wd x); c = y * factor [float32]; x <- round(c + sigma z) [+ fingerprint]
  kDpsgd = 2,      // x <- round(xd - lr ((gd + sigma z) / ebs + wd xd))  in double
  kNoise = 3,      // x <- round(xd + sigma z)
};

struct StepArgs {
  float lr = 0.f, factor = 1.f, wd = 0.f;  // float32 scalars of kGradClip / kModelClip
  double lr_d = 0.0, wd_d = 0.0, ebs = 1.0;  // double scalars of kDpsgd
  double sigma = 0.0;                        // noise scale (no noise at 0)
  ReleaseGrid grid{};                        // release grid near 0 of the written values' noise scale
  NoiseKey key{};
  bool want_fp = false;  // accumulate the fingerprint of the written values
  FpKey fp{};
};

// Applies one element-wise pass to every span (parallel over fixed blocks). Returns the fingerprint of
// the written values when args.want_fp (zeros otherwise).
Fingerprint apply_step(const std::vector<ParamSpan>& spans, StepKind kind, const StepArgs& args);

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

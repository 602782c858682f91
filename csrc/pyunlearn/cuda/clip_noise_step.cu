// CUDA multi-tensor clip + noise + update (gradient clipping, model clipping, DP-SGD), noise, keyed
// fingerprint and global norm.
//
// The CUDA twin of clip_noise_step.cpp and of triton_kernels/clip_noise_step.py, computing the functions
// of pyunlearn/ops/reference.py with the noise of pyunlearn/ops/rng.py (ChaCha20 + float64 Box-Muller,
// chacha.h). Layout: one table row per CUDA block, (param, grad, tensor start in the concatenation,
// numel, g0), where the block covers the global element indices g0 .. g0 + kBlockElems - 1 and g0 is a
// multiple of 4, so a thread draws the 4 normals of its 4 consecutive elements with one ChaCha20 block
// (at most one block per tensor boundary is drawn twice, by the blocks of both tensors).
//
// Launch counts are fixed whatever the number of tensors: gradient and model clipping 4 (pass 1 per
// block, one-block finalize, pass 2 per block, one-block finalize), DP-SGD 1, noise 1, fingerprint 2.
//
// Status and sync. NOTE: no host synchronisation. Pass 1 is read only (gradient or |y| squares and the
// fingerprint of the parameters, per block); the first finalize writes the step's result
// [status, norm, old_proj, old_sq, ., .] (float64, on the device), and every block of pass 2 reads the
// status first and returns without a write unless it is 0; the second finalize then copies the old
// fingerprint into the new one. The alternative (reading the status on the host between the passes)
// would cost a device round trip per step and make the step impossible to capture in a CUDA graph;
// the skipped pass 2 costs one launch of blocks that exit at once, only on a failed step. The clip
// factor is formed by each block of pass 2 from the norm in the result, rounded as the reference.
//
// Block tables are cached (TableCache: per device, stream, data pointers and sizes; a table holds only
// addresses and sizes, so a hit is always correct), so a repeated step uploads nothing. A miss while the
// stream is being captured into a CUDA graph is refused with a clear error (the staging copy could not
// be replayed safely): run the step once before capture. NOTE: a captured graph keeps using the table's
// device memory, so it must not outlive the table's cache entry (kTableCacheSize distinct tensor sets).
//
// Rounding: this file is compiled with --fmad=false (setup.py) and without fast math, so every
// element-wise operation rounds like the separate PyTorch ops of the reference and the float64 noise
// (IEEE +, -, *, /, sqrt in chacha.h's order) is bit-identical to the reference's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "../chacha.h"
#include "common.cuh"
#include "ops_cuda.h"

namespace pyunlearn::cuda {
namespace {

// NOTE: 4096 elements per block (16 per thread) amortises the row load and the block reductions and
// leaves ~1000 blocks at 4M parameters (several waves on 132 SMs). Not yet tuned on a GPU.
constexpr int64_t kBlockElems = 4096;
constexpr int kQuadsPerBlock = static_cast<int>(kBlockElems / 4);
constexpr size_t kTableCacheSize = 64;

struct Row {
  float* x;
  const float* g;
  int64_t first;  // global index of x[0]
  int64_t n;      // elements of the tensor
  int64_t g0;     // first global index of the block (multiple of 4)
};

// Float32 step hyper-parameters (rounded to float32 as PyTorch does for a float32 tensor), the float64
// noise scale, the noise key and the fingerprint key.
struct StepArgs {
  float lr = 0.f, wd = 0.f, max_norm = 0.f;
  double sigma = 0.0;
  ReleaseGrid grid{};  // of the noise scale sigma (snap near 0)
  NoiseKey key{};
  uint32_t fk0 = 0, fk1 = 0;
};

struct DpsgdArgs {
  double lr = 0.0, std = 0.0, ebs = 1.0, wd = 0.0;
  ReleaseGrid grid{};  // of the noise scale lr * std / ebs (snap near 0)
  NoiseKey key{};
};

// Pass-1 kinds: what is reduced per block besides (or instead of) the fingerprint.
enum class Pass1 : int { kFingerprint, kGradClip, kModelClip, kSumSq };

// The 4 elements p[i0 .. i0 + 3] that lie in [0, n) (zeros elsewhere); one 16-byte load when aligned.
__device__ __forceinline__ void load_quad(const float* p, int64_t i0, int64_t n, float v[4]) {
  if (i0 >= 0 && i0 + 4 <= n && (reinterpret_cast<uintptr_t>(p + i0) & 15) == 0) {
    const float4 t = *reinterpret_cast<const float4*>(p + i0);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = i0 + l;
    v[l] = (i >= 0 && i < n) ? p[i] : 0.0f;
  }
}

__device__ __forceinline__ void store_quad(float* p, int64_t i0, int64_t n, const float v[4]) {
  if (i0 >= 0 && i0 + 4 <= n && (reinterpret_cast<uintptr_t>(p + i0) & 15) == 0) {
    *reinterpret_cast<float4*>(p + i0) = make_float4(v[0], v[1], v[2], v[3]);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = i0 + l;
    if (i >= 0 && i < n) p[i] = v[l];
  }
}

// Per-thread fingerprint sums of the quad v at local index i0 (lanes outside [0, n) skipped). The same
// function, loop and lane order serve pass 1, pass 2 and the standalone fingerprint, so equal parameters
// give equal doubles.
__device__ __forceinline__ void accumulate_fp(const float v[4], int64_t i0, int64_t n, int64_t first,
                                              uint32_t fk0, uint32_t fk1, double& proj, double& sq) {
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = i0 + l;
    if (i >= 0 && i < n) {
      const double x = static_cast<double>(v[l]);
      proj += fingerprint_weight(static_cast<uint64_t>(first + i), fk0, fk1) * x;
      sq += x * x;
    }
  }
}

// Block sum valid in thread 0, with the barrier that lets the next reduction reuse the storage.
template <typename T>
__device__ __forceinline__ T block_total(T v) {
  const T total = block_sum(v);
  __syncthreads();
  return total;
}

// Sum of p[0 .. n) by one block in a fixed order (thread-strided partial sums, then a fixed tree).
__device__ __forceinline__ double block_sum_of(const double* p, int64_t n) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += p[i];
  return block_total(acc);
}

// Pass 1 (read only). partial: [squares (blocks) | proj (blocks) | sq (blocks)], float64. The squares are
// float32 sums per block (kGradClip: g; kModelClip: y = x - lr (g + wd x); kSumSq: x), stored exactly.
template <Pass1 kKind>
__global__ void __launch_bounds__(kThreads) pass1_kernel(const Row* rows, StepArgs a, double* partial,
                                                         int64_t blocks) {
  constexpr bool kFp = kKind != Pass1::kSumSq;
  constexpr bool kSquares = kKind != Pass1::kFingerprint;
  constexpr bool kReadsGrad = kKind == Pass1::kGradClip || kKind == Pass1::kModelClip;
  const Row r = rows[blockIdx.x];
  float acc = 0.0f;
  double proj = 0.0, sq = 0.0;
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    const int64_t i0 = r.g0 + 4 * qi - r.first;
    float x[4], g[4] = {0.f, 0.f, 0.f, 0.f};
    load_quad(r.x, i0, r.n, x);
    if constexpr (kReadsGrad) load_quad(r.g, i0, r.n, g);
    if constexpr (kSquares) {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        float v;
        if constexpr (kKind == Pass1::kGradClip) {
          v = g[l];
        } else if constexpr (kKind == Pass1::kModelClip) {
          const int64_t i = i0 + l;
          v = (i >= 0 && i < r.n) ? x[l] - a.lr * (g[l] + a.wd * x[l]) : 0.0f;
        } else {
          v = x[l];
        }
        acc += v * v;
      }
    }
    if constexpr (kFp) accumulate_fp(x, i0, r.n, r.first, a.fk0, a.fk1, proj, sq);
  }
  if constexpr (kSquares) {
    const float total = block_total(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<double>(total);
  }
  if constexpr (kFp) {
    const double p = block_total(proj);
    const double s = block_total(sq);
    if (threadIdx.x == 0) {
      partial[blocks + blockIdx.x] = p;
      partial[2 * blocks + blockIdx.x] = s;
    }
  }
}

struct Expected {
  bool has = false;
  double proj = 0.0, sq = 0.0;
};

// reference.fingerprint_matches for one entry: |a - b| <= FP_RTOL max(|a|, |b|) + 1e-300 (false on NaN).
__device__ __forceinline__ bool fp_matches(double a, double b) {
  return fabs(a - b) <= 1e-12 * fmax(fabs(a), fabs(b)) + 1e-300;
}

enum class Finalize : int { kStep, kFingerprint, kNorm };

// One block. kStep: res[0..3] = [status, norm, proj, sq] (status as reference._status); kFingerprint:
// res[0..1] = [proj, sq]; kNorm: *norm_out = sqrt(sum of squares) as float32.
template <Finalize kKind>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const double* partial, int64_t blocks, Expected e,
                                                            double* res, float* norm_out) {
  float norm = 0.0f;
  if constexpr (kKind != Finalize::kFingerprint) {
    norm = static_cast<float>(sqrt(block_sum_of(partial, blocks)));
  }
  if constexpr (kKind == Finalize::kNorm) {
    if (threadIdx.x == 0) *norm_out = norm;
  } else {
    const double proj = block_sum_of(partial + blocks, blocks);
    const double sq = block_sum_of(partial + 2 * blocks, blocks);
    if (threadIdx.x == 0) {
      if constexpr (kKind == Finalize::kStep) {
        double status = 0.0;
        if (!isfinite(norm)) {
          status = 1.0;
        } else if (e.has && !(fp_matches(proj, e.proj) && fp_matches(sq, e.sq))) {
          status = 2.0;
        }
        res[0] = status;
        res[1] = static_cast<double>(norm);
        res[2] = proj;
        res[3] = sq;
      } else {
        res[0] = proj;
        res[1] = sq;
      }
    }
  }
}

// res[4..5] = the new fingerprint from pass 2's partials, or the old one when the step did not run.
__global__ void __launch_bounds__(kThreads) finalize_new_kernel(const double* partial, int64_t blocks,
                                                                double* res) {
  const bool ran = res[0] == 0.0;  // uniform over the block
  double proj = 0.0, sq = 0.0;
  if (ran) {
    proj = block_sum_of(partial + blocks, blocks);
    sq = block_sum_of(partial + 2 * blocks, blocks);
  }
  if (threadIdx.x == 0) {
    res[4] = ran ? proj : res[2];
    res[5] = ran ? sq : res[3];
  }
}

// min(1, C / norm), 1 for a zero norm, rounded as reference.clip_factor in float32 (torch evaluates
// C / tensor as tensor.reciprocal() * C).
__device__ __forceinline__ float clip_factor(float norm, float max_norm) {
  return norm > max_norm ? (1.0f / fmaxf(norm, 1e-30f)) * max_norm : 1.0f;
}

// Pass 2, only when res[0] (status) is 0: c = x - lr (g f + wd x) (gradient clipping) or
// c = (x - lr (g + wd x)) f (model clipping), x <- round(c + sigma z) (float64 sum), new fingerprint.
template <bool kModel, bool kNoisy>
__global__ void __launch_bounds__(kThreads) pass2_kernel(const Row* rows, StepArgs a, const double* res,
                                                         double* partial, int64_t blocks) {
  if (res[0] != 0.0) return;  // the same for every thread of the grid: nothing is written
  const Row r = rows[blockIdx.x];
  const float f = clip_factor(static_cast<float>(res[1]), a.max_norm);
  double proj = 0.0, sq = 0.0;
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    const int64_t i0 = r.g0 + 4 * qi - r.first;
    float x[4], g[4];
    load_quad(r.x, i0, r.n, x);
    load_quad(r.g, i0, r.n, g);
    double z[4];
    if constexpr (kNoisy) normals_of_block(a.key, static_cast<uint64_t>(r.g0 >> 2) + static_cast<uint64_t>(qi), z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      float c;
      if constexpr (kModel) {
        const float y = x[l] - a.lr * (g[l] + a.wd * x[l]);
        c = y * f;
      } else {
        c = x[l] - a.lr * (g[l] * f + a.wd * x[l]);
      }
      if constexpr (kNoisy) c = release32(static_cast<double>(c) + a.sigma * z[l], a.grid);
      x[l] = c;
    }
    store_quad(r.x, i0, r.n, x);
    accumulate_fp(x, i0, r.n, r.first, a.fk0, a.fk1, proj, sq);
  }
  const double p = block_total(proj);
  const double s = block_total(sq);
  if (threadIdx.x == 0) {
    partial[blocks + blockIdx.x] = p;
    partial[2 * blocks + blockIdx.x] = s;
  }
}

// DP-SGD in float64, rounded once: x <- round(x - lr (nd / ebs + wd x)), nd = g + std z (g without noise).
template <bool kNoisy>
__global__ void __launch_bounds__(kThreads) dpsgd_kernel(const Row* rows, DpsgdArgs a) {
  const Row r = rows[blockIdx.x];
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    const int64_t i0 = r.g0 + 4 * qi - r.first;
    float x[4], g[4];
    load_quad(r.x, i0, r.n, x);
    load_quad(r.g, i0, r.n, g);
    double z[4];
    if constexpr (kNoisy) normals_of_block(a.key, static_cast<uint64_t>(r.g0 >> 2) + static_cast<uint64_t>(qi), z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      double nd = static_cast<double>(g[l]);
      if constexpr (kNoisy) nd = nd + a.std * z[l];
      const double xd = static_cast<double>(x[l]);
      x[l] = release32(xd - a.lr * (nd / a.ebs + a.wd * xd), a.grid);
    }
    store_quad(r.x, i0, r.n, x);
  }
}

// x <- round(x + sigma z) (float64 sum, one rounding).
__global__ void __launch_bounds__(kThreads) add_noise_kernel(const Row* rows, double sigma, ReleaseGrid grid,
                                                              NoiseKey key) {
  const Row r = rows[blockIdx.x];
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    const int64_t i0 = r.g0 + 4 * qi - r.first;
    float x[4];
    load_quad(r.x, i0, r.n, x);
    double z[4];
    normals_of_block(key, static_cast<uint64_t>(r.g0 >> 2) + static_cast<uint64_t>(qi), z);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = release32(static_cast<double>(x[l]) + sigma * z[l], grid);
    store_quad(r.x, i0, r.n, x);
  }
}

__global__ void __launch_bounds__(kThreads) gaussian_noise_kernel(double* out, int64_t numel, uint64_t offset,
                                                                  NoiseKey key) {
  const uint64_t b_first = offset >> 2;
  const uint64_t b_last = (offset + static_cast<uint64_t>(numel) - 1) >> 2;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t b = b_first + blockIdx.x * static_cast<uint64_t>(kThreads) + threadIdx.x; b <= b_last; b += stride) {
    double z[4];
    normals_of_block(key, b, z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const uint64_t e = 4 * b + l;  // global element index
      if (e >= offset && e < offset + static_cast<uint64_t>(numel)) out[e - offset] = z[l];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
struct Plan {
  at::Tensor table;  // Row[blocks] as bytes, on the device (cached)
  int64_t blocks = 0;
  at::Device device = at::kCPU;
};

// LRU cache of device block tables keyed by (device, stream, [x, g, numel] per tensor).
class TableCache {
 public:
  struct Entry {
    std::vector<int64_t> key;
    at::Tensor table;
    int64_t blocks;
  };

  bool find(const std::vector<int64_t>& key, Plan& plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);
        plan.table = it->table;
        plan.blocks = it->blocks;
        return true;
      }
    }
    return false;
  }

  void insert(std::vector<int64_t> key, const Plan& plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(Entry{std::move(key), plan.table, plan.blocks});
    while (entries_.size() > kTableCacheSize) entries_.pop_back();
  }

 private:
  std::mutex mutex_;
  std::list<Entry> entries_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: no CUDA frees at interpreter exit
  return *cache;
}

void check_tensor(const at::Tensor& t, const at::Device& device, const char* what, const char* name, size_t i) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous(), what, ": ", name, "[",
              i, "] must be a contiguous float32 tensor on ", device);
}

Plan make_plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* grads, const char* what) {
  TORCH_CHECK(!params.empty(), what, ": no tensors");
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == params.size(), what, ": got ", params.size(), " params but ", grads->size(),
                " grads");
  }
  Plan plan;
  plan.device = params[0].device();
  TORCH_CHECK(plan.device.is_cuda(), what, ": tensors must be on a CUDA device, got ", plan.device);
  const cudaStream_t stream = current_stream();
  std::vector<int64_t> key{static_cast<int64_t>(plan.device.index()),
                           static_cast<int64_t>(reinterpret_cast<uintptr_t>(stream))};
  key.reserve(2 + 3 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(params[i], plan.device, what, "params", i);
    const float* g = nullptr;
    if (grads != nullptr) {
      const at::Tensor& gt = (*grads)[i];
      check_tensor(gt, plan.device, what, "grads", i);
      TORCH_CHECK(gt.numel() == params[i].numel(), what, ": grads[", i, "] has ", gt.numel(), " elements, params[",
                  i, "] has ", params[i].numel());
      g = gt.data_ptr<float>();
    }
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(params[i].data_ptr<float>())));
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(g)));
    key.push_back(params[i].numel());
  }
  if (table_cache().find(key, plan)) return plan;

  std::vector<Row> rows;
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const float* g = grads != nullptr ? (*grads)[i].data_ptr<float>() : nullptr;
    const int64_t n = p.numel();
    for (int64_t g0 = offset & ~int64_t{3}; n > 0 && g0 < offset + n; g0 += kBlockElems) {
      rows.push_back(Row{p.data_ptr<float>(), g, offset, n, g0});
    }
    offset += n;
  }
  TORCH_CHECK(rows.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()), what, ": too many elements");
  plan.blocks = static_cast<int64_t>(rows.size());
  if (plan.blocks > 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, what,
                ": these tensors have no cached block table and one cannot be uploaded during CUDA-graph capture; "
                "run the operation once on these tensors (on this stream) before capturing it");
    // Pinned staging buffer + asynchronous copy on the current stream (the caching host allocator keeps
    // the buffer alive until the copy has run; the cache key includes the stream, so every later use is
    // ordered after the copy).
    const int64_t bytes = plan.blocks * static_cast<int64_t>(sizeof(Row));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), rows.data(), static_cast<size_t>(bytes));
    plan.table = host.to(plan.device, /*non_blocking=*/true);
  }
  table_cache().insert(std::move(key), plan);
  return plan;
}

// The device of the first tensor, checked to be CUDA before a device guard is made for it.
at::Device cuda_device(const std::vector<at::Tensor>& tensors, const char* what) {
  TORCH_CHECK(!tensors.empty(), what, ": no tensors");
  TORCH_CHECK(tensors[0].is_cuda(), what, ": tensors must be on a CUDA device, got ", tensors[0].device());
  return tensors[0].device();
}

const Row* rows_of(const Plan& plan) { return reinterpret_cast<const Row*>(plan.table.data_ptr()); }

uint32_t word32(int64_t w, const char* what, const char* name) {
  TORCH_CHECK(w >= 0 && w <= int64_t{0xFFFFFFFF}, what, ": ", name, " words must be in [0, 2**32), got ", w);
  return static_cast<uint32_t>(w);
}

NoiseKey noise_key(const std::vector<int64_t>& key, int64_t step, int64_t stream, const char* what) {
  TORCH_CHECK(key.size() == 8, what, ": key must be 8 32-bit words (a 256-bit ChaCha20 key), got ", key.size());
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), what, ": step must be in [0, 2**32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < (int64_t{1} << 32), what, ": stream must be in [0, 2**32), got ", stream);
  NoiseKey k{};
  for (int j = 0; j < 8; ++j) k.k[j] = word32(key[j], what, "key");
  k.step = static_cast<uint32_t>(step);
  k.stream = static_cast<uint32_t>(stream);
  return k;
}

void set_fp_key(StepArgs& a, const std::vector<int64_t>& fp_key, const char* what) {
  TORCH_CHECK(fp_key.size() == 2, what, ": fp_key must be 2 32-bit words, got ", fp_key.size());
  a.fk0 = word32(fp_key[0], what, "fp_key");
  a.fk1 = word32(fp_key[1], what, "fp_key");
}

Expected expected_of(const std::vector<double>& expected_fp, const char* what) {
  TORCH_CHECK(expected_fp.empty() || expected_fp.size() == 2, what,
              ": expected_fp must be empty or [proj, sq], got ", expected_fp.size(), " values");
  Expected e;
  if (!expected_fp.empty()) {
    e.has = true;
    e.proj = expected_fp[0];
    e.sq = expected_fp[1];
  }
  return e;
}

at::Tensor partial_buffer(const Plan& plan) {
  return at::empty({3 * plan.blocks}, at::TensorOptions().dtype(at::kDouble).device(plan.device));
}

template <Pass1 kKind>
void launch_pass1(const Plan& plan, const StepArgs& a, const at::Tensor& partial) {
  if (plan.blocks == 0) return;
  pass1_kernel<kKind><<<static_cast<unsigned>(plan.blocks), kThreads, 0, current_stream()>>>(
      rows_of(plan), a, partial.data_ptr<double>(), plan.blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Finalize kKind>
void launch_finalize(const Plan& plan, const at::Tensor& partial, const Expected& e, double* res, float* norm) {
  finalize_kernel<kKind><<<1, kThreads, 0, current_stream()>>>(partial.data_ptr<double>(), plan.blocks, e, res, norm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kModel>
void launch_pass2(const Plan& plan, const StepArgs& a, const at::Tensor& res, const at::Tensor& partial) {
  if (plan.blocks == 0) return;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (a.sigma != 0.0) {
    pass2_kernel<kModel, true><<<grid, kThreads, 0, current_stream()>>>(
        rows_of(plan), a, res.data_ptr<double>(), partial.data_ptr<double>(), plan.blocks);
  } else {
    pass2_kernel<kModel, false><<<grid, kThreads, 0, current_stream()>>>(
        rows_of(plan), a, res.data_ptr<double>(), partial.data_ptr<double>(), plan.blocks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kModel>
at::Tensor clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                         double max_norm, double weight_decay, double sigma, const std::vector<int64_t>& key,
                         int64_t step, const std::vector<int64_t>& fp_key, const std::vector<double>& expected_fp,
                         const char* what) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, what));
  StepArgs a;
  a.lr = static_cast<float>(lr);
  a.wd = static_cast<float>(weight_decay);
  a.max_norm = static_cast<float>(max_norm);
  a.sigma = sigma;
  a.grid = release_grid(sigma);
  a.key = noise_key(key, step, 0 /* STREAM_UPDATE */, what);
  set_fp_key(a, fp_key, what);
  const Expected e = expected_of(expected_fp, what);
  const Plan plan = make_plan(params, &grads, what);
  const at::Tensor partial = partial_buffer(plan);
  at::Tensor res = at::empty({6}, at::TensorOptions().dtype(at::kDouble).device(plan.device));
  launch_pass1<kModel ? Pass1::kModelClip : Pass1::kGradClip>(plan, a, partial);
  launch_finalize<Finalize::kStep>(plan, partial, e, res.data_ptr<double>(), nullptr);
  launch_pass2<kModel>(plan, a, res, partial);
  finalize_new_kernel<<<1, kThreads, 0, current_stream()>>>(partial.data_ptr<double>(), plan.blocks,
                                                             res.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

}  // namespace

at::Tensor gradient_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                  double lr, double max_grad_norm, double weight_decay, double sigma,
                                  const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                                  const std::vector<double>& expected_fp) {
  return clipping_step<false>(params, grads, lr, max_grad_norm, weight_decay, sigma, key, step, fp_key, expected_fp,
                              "gradient_clipping_step_");
}

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma,
                               const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                               const std::vector<double>& expected_fp) {
  return clipping_step<true>(params, grads, lr, max_model_norm, weight_decay, sigma, key, step, fp_key, expected_fp,
                             "model_clipping_step_");
}

void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, const std::vector<int64_t>& key,
                int64_t step) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, "dpsgd_step_"));
  DpsgdArgs a;
  a.lr = lr;
  a.std = noise_std;
  a.ebs = expected_batch_size;
  a.wd = weight_decay;
  a.grid = release_grid(noise_std > 0.0 ? lr * noise_std / expected_batch_size : 0.0);
  a.key = noise_key(key, step, 0 /* STREAM_UPDATE */, "dpsgd_step_");
  const Plan plan = make_plan(params, &grads, "dpsgd_step_");
  if (plan.blocks == 0) return;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (noise_std > 0.0) {  // as the reference: no noise for std <= 0
    dpsgd_kernel<true><<<grid, kThreads, 0, current_stream()>>>(rows_of(plan), a);
  } else {
    dpsgd_kernel<false><<<grid, kThreads, 0, current_stream()>>>(rows_of(plan), a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_noise(const std::vector<at::Tensor>& params, double sigma, const std::vector<int64_t>& key, int64_t step,
               int64_t stream) {
  const NoiseKey k = noise_key(key, step, stream, "add_noise_");
  if (sigma == 0.0) return;
  const c10::cuda::CUDAGuard guard(cuda_device(params, "add_noise_"));
  const Plan plan = make_plan(params, nullptr, "add_noise_");
  if (plan.blocks == 0) return;
  add_noise_kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, current_stream()>>>(rows_of(plan), sigma,
                                                                                         release_grid(sigma), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fingerprint(const std::vector<at::Tensor>& params, const std::vector<int64_t>& fp_key) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, "fingerprint"));
  StepArgs a;
  set_fp_key(a, fp_key, "fingerprint");
  const Plan plan = make_plan(params, nullptr, "fingerprint");
  const at::Tensor partial = partial_buffer(plan);
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble).device(plan.device));
  launch_pass1<Pass1::kFingerprint>(plan, a, partial);
  launch_finalize<Finalize::kFingerprint>(plan, partial, Expected{}, out.data_ptr<double>(), nullptr);
  return out;
}

at::Tensor global_norm(const std::vector<at::Tensor>& tensors) {
  const c10::cuda::CUDAGuard guard(cuda_device(tensors, "global_norm"));
  const Plan plan = make_plan(tensors, nullptr, "global_norm");
  const at::Tensor partial = partial_buffer(plan);
  at::Tensor norm = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(plan.device));
  launch_pass1<Pass1::kSumSq>(plan, StepArgs{}, partial);
  launch_finalize<Finalize::kNorm>(plan, partial, Expected{}, nullptr, norm.data_ptr<float>());
  return norm;
}

at::Tensor gaussian_noise(int64_t numel, const std::vector<int64_t>& key, int64_t step, int64_t offset,
                          int64_t stream, int64_t device_index) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "gaussian_noise: numel and offset must be >= 0, got numel=", numel,
              ", offset=", offset);
  TORCH_CHECK(device_index >= 0 && device_index <= std::numeric_limits<c10::DeviceIndex>::max(),
              "gaussian_noise: bad CUDA device index ", device_index);
  const NoiseKey k = noise_key(key, step, stream, "gaussian_noise");
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kDouble).device(device));
  if (numel == 0) return out;
  const int64_t chacha_blocks = ((offset + numel - 1) >> 2) - (offset >> 2) + 1;
  const int64_t blocks = std::min<int64_t>((chacha_blocks + kThreads - 1) / kThreads, int64_t{1} << 16);
  gaussian_noise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
      out.data_ptr<double>(), numel, static_cast<uint64_t>(offset), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pyunlearn::cuda

// CUDA multi-tensor clip + noise + update (gradient clipping, model clipping, DP-SGD, noise, norm).
//
// The CUDA twin of clip_noise_step.cpp and of triton_kernels/clip_noise_step.py, with the same layout:
// one table row per CUDA block, (param, grad, tensor start in the concatenation, numel, g0), where the
// block covers the global element indices g0 .. g0 + kBlockElems - 1 and g0 is a multiple of 4, so a
// thread draws the noise of 4 consecutive elements with one Philox call. Launch counts are fixed:
// gradient clipping 3 (squares per block, deterministic norm + clip factor in one block, update),
// model clipping 3, DP-SGD 1, whatever the number of tensors. The clip factor stays on the device
// (no host synchronisation).
//
// Rounding: this file is compiled with --fmad=false (setup.py) and without fast math, so every
// element-wise operation rounds like the separate PyTorch ops of the reference; sigma = 0 reproduces
// it bit for bit whenever the norm (hence the clip factor) is the same.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../philox.h"
#include "common.cuh"
#include "ops_cuda.h"

namespace pyunlearn::cuda {
namespace {

// NOTE: 4096 elements per block (16 per thread) amortises the row load and the block reduction and
// leaves ~1000 blocks at 4M parameters (several waves on 132 SMs). Not yet tuned on a GPU.
constexpr int64_t kBlockElems = 4096;
constexpr int kQuadsPerBlock = static_cast<int>(kBlockElems / 4);

constexpr float kTwoPowM32 = 2.3283064365386963e-10f;  // 2^-32
constexpr float kTwoPowM33 = 1.1641532182693481e-10f;  // 2^-33
constexpr float kTwoPi = 6.2831854820251465f;          // float32(2 pi)

struct Row {
  float* x;
  const float* g;
  int64_t first;  // global index of x[0]
  int64_t n;      // elements of the tensor
  int64_t g0;     // first global index of the block (multiple of 4)
};

enum class Kind : int { kGradClip, kModelUpdate, kScale, kDpsgd, kNoise };

struct Args {
  float lr = 0.f, wd = 0.f, sigma = 0.f, ebs = 1.f;
  NoiseKey key{};
};

// Standard normal noise of the 4 elements of global quad q (pyunlearn.ops.rng, in float32).
__device__ __forceinline__ void normal_quad(const NoiseKey& key, uint64_t q, float z[4]) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = key.step, c3 = key.stream;
  philox4x32_10(c0, c1, c2, c3, key.k0, key.k1);
  const float u0 = static_cast<float>(c0) * kTwoPowM32 + kTwoPowM33;
  const float u1 = static_cast<float>(c1) * kTwoPowM32 + kTwoPowM33;
  const float u2 = static_cast<float>(c2) * kTwoPowM32 + kTwoPowM33;
  const float u3 = static_cast<float>(c3) * kTwoPowM32 + kTwoPowM33;
  const float ra = sqrtf(-2.0f * logf(u0));
  const float rb = sqrtf(-2.0f * logf(u2));
  float sa, ca, sb, cb;
  sincosf(kTwoPi * u1, &sa, &ca);
  sincosf(kTwoPi * u3, &sb, &cb);
  z[0] = ra * ca;
  z[1] = ra * sa;
  z[2] = rb * cb;
  z[3] = rb * sb;
}

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

__global__ void __launch_bounds__(kThreads) sumsq_kernel(const Row* rows, bool of_grads, float* partial) {
  const Row r = rows[blockIdx.x];
  const float* v = of_grads ? r.g : r.x;
  float acc = 0.0f;
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    float q[4];
    load_quad(v, r.g0 + 4 * qi - r.first, r.n, q);
#pragma unroll
    for (int l = 0; l < 4; ++l) acc += q[l] * q[l];
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// out[0] = sqrt(sum partial) (double accumulation, fixed order), out[1] = min(1, C / out[0]) rounded
// exactly as reference.clip_factor in float32.
__global__ void __launch_bounds__(kThreads) finalize_norm_kernel(const float* partial, int64_t n, float max_norm,
                                                                 float* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += static_cast<double>(partial[i]);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) {
    const float norm = static_cast<float>(sqrt(total));
    out[0] = norm;
    out[1] = norm > max_norm ? (1.0f / fmaxf(norm, 1e-30f)) * max_norm : 1.0f;  // torch: reciprocal, then * C
  }
}

template <Kind kKind, bool kNoisy>
__global__ void __launch_bounds__(kThreads) update_kernel(const Row* rows, const float* factor_ptr, Args a,
                                                          float* partial) {
  constexpr bool kReadsGrad = kKind == Kind::kGradClip || kKind == Kind::kModelUpdate || kKind == Kind::kDpsgd;
  const Row r = rows[blockIdx.x];
  const float f = factor_ptr != nullptr ? *factor_ptr : 1.0f;
  float acc = 0.0f;
  for (int qi = threadIdx.x; qi < kQuadsPerBlock; qi += kThreads) {
    const int64_t i0 = r.g0 + 4 * qi - r.first;
    float x[4], g[4] = {0.f, 0.f, 0.f, 0.f}, z[4] = {0.f, 0.f, 0.f, 0.f};
    load_quad(r.x, i0, r.n, x);
    if constexpr (kReadsGrad) load_quad(r.g, i0, r.n, g);
    if constexpr (kNoisy) normal_quad(a.key, static_cast<uint64_t>(r.g0 >> 2) + static_cast<uint64_t>(qi), z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      float y;
      if constexpr (kKind == Kind::kGradClip) {  // p -= lr * (g * factor + wd * p); p += sigma * z
        y = x[l] - a.lr * (g[l] * f + a.wd * x[l]);
        if constexpr (kNoisy) y = y + a.sigma * z[l];
      } else if constexpr (kKind == Kind::kModelUpdate) {  // p -= lr * (g + wd * p); |p|^2
        y = x[l] - a.lr * (g[l] + a.wd * x[l]);
        acc += y * y;  // lanes outside the tensor have x = g = 0, so y = 0
      } else if constexpr (kKind == Kind::kScale) {  // p *= factor; p += sigma * z
        y = x[l] * f;
        if constexpr (kNoisy) y = y + a.sigma * z[l];
      } else if constexpr (kKind == Kind::kDpsgd) {  // p -= lr * ((g + std * z) / ebs + wd * p)
        const float noisy = kNoisy ? g[l] + a.sigma * z[l] : g[l];
        y = x[l] - a.lr * (noisy / a.ebs + a.wd * x[l]);
      } else {  // kNoise: p += sigma * z
        y = x[l] + a.sigma * z[l];
      }
      x[l] = y;
    }
    store_quad(r.x, i0, r.n, x);
  }
  if constexpr (kKind == Kind::kModelUpdate) {
    const float total = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kThreads) noise_kernel(float* out, int64_t numel, uint64_t offset, NoiseKey key) {
  const uint64_t q_first = offset >> 2;
  const uint64_t q_last = (offset + static_cast<uint64_t>(numel) - 1) >> 2;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t q = q_first + blockIdx.x * static_cast<uint64_t>(kThreads) + threadIdx.x; q <= q_last; q += stride) {
    float z[4];
    normal_quad(key, q, z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const uint64_t e = 4 * q + l;  // global element index
      if (e >= offset && e < offset + static_cast<uint64_t>(numel)) out[e - offset] = z[l];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
struct Plan {
  at::Tensor table;  // Row[blocks] as bytes, on the device
  int64_t blocks = 0;
  at::Device device = at::kCPU;
};

Plan make_plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* grads, const char* what) {
  TORCH_CHECK(!params.empty(), what, ": no tensors");
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == params.size(), what, ": got ", params.size(), " params but ", grads->size(),
                " grads");
  }
  Plan plan;
  plan.device = params[0].device();
  std::vector<Row> rows;
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == plan.device && p.scalar_type() == at::kFloat && p.is_contiguous(), what,
                ": params[", i, "] must be a contiguous float32 tensor on ", plan.device);
    const float* g = nullptr;
    if (grads != nullptr) {
      const at::Tensor& gt = (*grads)[i];
      TORCH_CHECK(gt.device() == plan.device && gt.scalar_type() == at::kFloat && gt.is_contiguous(), what,
                  ": grads[", i, "] must be a contiguous float32 tensor on ", plan.device);
      TORCH_CHECK(gt.numel() == p.numel(), what, ": grads[", i, "] has ", gt.numel(), " elements, params[", i,
                  "] has ", p.numel());
      g = gt.data_ptr<float>();
    }
    const int64_t n = p.numel();
    for (int64_t g0 = offset & ~int64_t{3}; n > 0 && g0 < offset + n; g0 += kBlockElems) {
      rows.push_back(Row{p.data_ptr<float>(), g, offset, n, g0});
    }
    offset += n;
  }
  TORCH_CHECK(plan.device.is_cuda(), what, ": tensors must be on a CUDA device, got ", plan.device);
  TORCH_CHECK(rows.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()), what, ": too many elements");
  plan.blocks = static_cast<int64_t>(rows.size());
  if (plan.blocks > 0) {
    // Pinned staging buffer + asynchronous copy on the current stream (the caching host allocator keeps
    // the buffer alive until the copy has run).
    const int64_t bytes = plan.blocks * static_cast<int64_t>(sizeof(Row));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), rows.data(), static_cast<size_t>(bytes));
    plan.table = host.to(plan.device, /*non_blocking=*/true);
  }
  return plan;
}

// The device of the first tensor, checked to be CUDA before a device guard is made for it.
at::Device cuda_device(const std::vector<at::Tensor>& tensors, const char* what) {
  TORCH_CHECK(!tensors.empty(), what, ": no tensors");
  TORCH_CHECK(tensors[0].is_cuda(), what, ": tensors must be on a CUDA device, got ", tensors[0].device());
  return tensors[0].device();
}

const Row* rows_of(const Plan& plan) { return reinterpret_cast<const Row*>(plan.table.data_ptr()); }

NoiseKey key_of(int64_t seed, int64_t step, int64_t stream) {
  TORCH_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), "step must be in [0, 2**32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < (int64_t{1} << 32), "stream must be in [0, 2**32), got ", stream);
  return make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<uint32_t>(stream));
}

template <Kind kKind>
void launch_update(const Plan& plan, const float* factor, const Args& a, float* partial) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if constexpr (kKind != Kind::kModelUpdate) {  // the descent pass of model clipping has no noise
    if (a.sigma != 0.0f) {
      update_kernel<kKind, true><<<grid, kThreads, 0, current_stream()>>>(rows_of(plan), factor, a, partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  update_kernel<kKind, false><<<grid, kThreads, 0, current_stream()>>>(rows_of(plan), factor, a, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [norm, clip factor] on the device from the per-block partial sums.
at::Tensor finalize_norm(const Plan& plan, const at::Tensor& partial, double max_norm) {
  at::Tensor out = at::empty({2}, partial.options());
  finalize_norm_kernel<<<1, kThreads, 0, current_stream()>>>(partial.data_ptr<float>(), plan.blocks,
                                                              static_cast<float>(max_norm), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sumsq_partials(const Plan& plan, bool of_grads) {
  at::Tensor partial = at::empty({plan.blocks}, at::TensorOptions().dtype(at::kFloat).device(plan.device));
  sumsq_kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, current_stream()>>>(rows_of(plan), of_grads,
                                                                                     partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

Args make_args(double lr, double weight_decay, double sigma, int64_t seed, int64_t step, int64_t stream = 0) {
  Args a;
  a.lr = static_cast<float>(lr);
  a.wd = static_cast<float>(weight_decay);
  a.sigma = static_cast<float>(sigma);
  a.key = key_of(seed, step, stream);
  return a;
}

at::Tensor zero_norm(const at::Device& device) {
  return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
}

}  // namespace

at::Tensor gradient_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                  double lr, double max_grad_norm, double weight_decay, double sigma, int64_t seed,
                                  int64_t step) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, "gradient_clipping_step_"));
  const Plan plan = make_plan(params, &grads, "gradient_clipping_step_");
  if (plan.blocks == 0) return zero_norm(plan.device);
  const Args a = make_args(lr, weight_decay, sigma, seed, step);
  const at::Tensor norm = finalize_norm(plan, sumsq_partials(plan, /*of_grads=*/true), max_grad_norm);
  launch_update<Kind::kGradClip>(plan, norm.data_ptr<float>() + 1, a, nullptr);
  return norm[0];
}

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma, int64_t seed,
                               int64_t step) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, "model_clipping_step_"));
  const Plan plan = make_plan(params, &grads, "model_clipping_step_");
  if (plan.blocks == 0) return zero_norm(plan.device);
  const Args a = make_args(lr, weight_decay, sigma, seed, step);  // the descent pass draws no noise
  at::Tensor partial = at::empty({plan.blocks}, at::TensorOptions().dtype(at::kFloat).device(plan.device));
  launch_update<Kind::kModelUpdate>(plan, nullptr, a, partial.data_ptr<float>());
  const at::Tensor norm = finalize_norm(plan, partial, max_model_norm);
  launch_update<Kind::kScale>(plan, norm.data_ptr<float>() + 1, a, nullptr);
  return norm[0];
}

void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, int64_t seed, int64_t step) {
  const c10::cuda::CUDAGuard guard(cuda_device(params, "dpsgd_step_"));
  const Plan plan = make_plan(params, &grads, "dpsgd_step_");
  if (plan.blocks == 0) return;
  Args a = make_args(lr, weight_decay, noise_std > 0.0 ? noise_std : 0.0, seed, step);
  a.ebs = static_cast<float>(expected_batch_size);
  launch_update<Kind::kDpsgd>(plan, nullptr, a, nullptr);
}

void add_noise(const std::vector<at::Tensor>& params, double sigma, int64_t seed, int64_t step, int64_t stream) {
  if (sigma == 0.0) return;
  const c10::cuda::CUDAGuard guard(cuda_device(params, "add_noise_"));
  const Plan plan = make_plan(params, nullptr, "add_noise_");
  if (plan.blocks == 0) return;
  launch_update<Kind::kNoise>(plan, nullptr, make_args(0.0, 0.0, sigma, seed, step, stream), nullptr);
}

at::Tensor global_norm(const std::vector<at::Tensor>& tensors) {
  const c10::cuda::CUDAGuard guard(cuda_device(tensors, "global_norm"));
  const Plan plan = make_plan(tensors, nullptr, "global_norm");
  if (plan.blocks == 0) return zero_norm(plan.device);
  return finalize_norm(plan, sumsq_partials(plan, /*of_grads=*/false), std::numeric_limits<double>::infinity())[0];
}

at::Tensor gaussian_noise(int64_t numel, int64_t seed, int64_t step, int64_t offset, int64_t stream,
                          const at::Device& device) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "gaussian_noise: numel and offset must be >= 0");
  TORCH_CHECK(device.is_cuda(), "gaussian_noise: device must be CUDA, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  const NoiseKey key = key_of(seed, step, stream);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (numel == 0) return out;
  const int64_t quads = ((offset + numel - 1) >> 2) - (offset >> 2) + 1;
  const int64_t blocks = std::min<int64_t>((quads + kThreads - 1) / kThreads, int64_t{1} << 16);
  noise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
      out.data_ptr<float>(), numel, static_cast<uint64_t>(offset), key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pyunlearn::cuda

// CUDA masked pixel cross-entropy, forward and backward in one pass over the logits.
//
// One thread per pixel, 256 pixels of one sample per block (grid: B x ceil(N / 256), flattened). A
// thread walks the K logits of its pixel (stride sk: consecutive threads read consecutive pixels, so
// each class row is read coalesced), takes the max and the target logit, sums the exponentials in a
// second sweep and writes the gradient in a third (the K values of a 256-pixel block are L1/L2
// resident by then, so DRAM sees the logits once). Each block writes one partial sum of the scaled
// pixel losses; the per-sample loss is the sum of its partials in a fixed order (no atomics), so the
// result is deterministic.
//
// As the C++ kernel: masked-out pixels contribute an exact 0 to loss and gradient. A target outside
// [0, K) (K >= 2) cannot raise here without a device synchronisation; it makes the loss of its sample
// NaN (pyunlearn.losses validates targets before calling the op).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "common.cuh"
#include "ops_cuda.h"

namespace pyunlearn::cuda {
namespace {

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) masked_ce_kernel(
    const scalar_t* __restrict__ logits, int64_t K, int64_t N, int64_t sb, int64_t sk, int64_t sn,
    const index_t* __restrict__ target, const bool* __restrict__ mask, const int64_t* __restrict__ count,
    const acc_t* __restrict__ weight, scalar_t* __restrict__ grad, acc_t* __restrict__ partial, int64_t n_blocks) {
  const int64_t b = blockIdx.x / n_blocks;
  const int64_t nb = blockIdx.x % n_blocks;
  const int64_t n = nb * kThreads + threadIdx.x;
  acc_t contribution = acc_t(0);
  if (n < N) {
    const bool on = mask[b * N + n];
    // Reference: scale = mask / max(count, 1) * weight.
    acc_t scale = acc_t(1) / static_cast<acc_t>(count[b] > 1 ? count[b] : 1);
    if (weight != nullptr) scale = scale * weight[b];
    const int64_t t = static_cast<int64_t>(target[b * N + n]);
    const scalar_t* x = logits + b * sb + n * sn;
    scalar_t* gout = grad + b * K * N + n;
    if (!on) {
      for (int64_t k = 0; k < K; ++k) gout[k * N] = scalar_t(0);
      if (K >= 2 && (t < 0 || t >= K)) contribution = NAN;
    } else if (K == 1) {
      // Sigmoid BCE: max(z, 0) - z y + log1p(exp(-|z|)), gradient (sigmoid(z) - y) scale.
      const acc_t z = static_cast<acc_t>(x[0]);
      const acc_t y = static_cast<acc_t>(t);
      const acc_t e = exp(-fabs(z));
      const acc_t pixel = (z > acc_t(0) ? z : acc_t(0)) - z * y + log1p(e);
      const acc_t inv = acc_t(1) / (acc_t(1) + e);
      const acc_t sig = z >= acc_t(0) ? inv : e * inv;
      gout[0] = static_cast<scalar_t>((sig - y) * scale);
      contribution = pixel * scale;
    } else if (t < 0 || t >= K) {
      for (int64_t k = 0; k < K; ++k) gout[k * N] = static_cast<scalar_t>(NAN);
      contribution = NAN;
    } else {
      acc_t mx = static_cast<acc_t>(x[0]);
      for (int64_t k = 1; k < K; ++k) mx = fmax(mx, static_cast<acc_t>(x[k * sk]));
      acc_t sum = acc_t(0);
      for (int64_t k = 0; k < K; ++k) sum += exp(static_cast<acc_t>(x[k * sk]) - mx);
      const acc_t xt = static_cast<acc_t>(x[t * sk]);
      const acc_t ratio = scale / sum;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t p = exp(static_cast<acc_t>(x[k * sk]) - mx) * ratio;  // softmax * scale
        gout[k * N] = static_cast<scalar_t>(k == t ? p - scale : p);
      }
      contribution = (log(sum) - (xt - mx)) * scale;
    }
  }
  const acc_t total = block_sum(contribution);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_typed(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& count,
                  const acc_t* weight, at::Tensor& grad, at::Tensor& partial, int64_t n_blocks) {
  const dim3 grid(static_cast<unsigned>(logits.size(0) * n_blocks));
  masked_ce_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, current_stream()>>>(
      logits.data_ptr<scalar_t>(), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1),
      logits.stride(2), static_cast<const index_t*>(target.const_data_ptr()), mask.data_ptr<bool>(),
      count.data_ptr<int64_t>(), weight, grad.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), n_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& count,
            const c10::optional<at::Tensor>& weight, at::Tensor& grad, at::Tensor& partial, int64_t n_blocks) {
  const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
  switch (target.scalar_type()) {
    case at::kLong:
      return launch_typed<scalar_t, acc_t, int64_t>(logits, target, mask, count, w, grad, partial, n_blocks);
    case at::kInt:
      return launch_typed<scalar_t, acc_t, int32_t>(logits, target, mask, count, w, grad, partial, n_blocks);
    default:
      return launch_typed<scalar_t, acc_t, uint8_t>(logits, target, mask, count, w, grad, partial, n_blocks);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_cross_entropy_fwd_bwd(const at::Tensor& logits, const at::Tensor& target,
                                                                const at::Tensor& mask,
                                                                const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_cuda(), "masked_cross_entropy: logits must be (B, K, N) on CUDA");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), K = logits.size(1), N = logits.size(2);
  TORCH_CHECK(K >= 1, "masked_cross_entropy: K must be >= 1");
  TORCH_CHECK(target.sizes() == at::IntArrayRef({B, N}) && target.is_contiguous() && target.device() == logits.device(),
              "masked_cross_entropy: target must be a contiguous (B, N) tensor on ", logits.device());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt ||
                  target.scalar_type() == at::kByte,
              "masked_cross_entropy: target must be int64, int32 or uint8, got ", target.scalar_type());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef({B, N}) && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
                  mask.device() == logits.device(),
              "masked_cross_entropy: mask must be a contiguous (B, N) bool tensor on ", logits.device());
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (weight.has_value()) {
    TORCH_CHECK(weight->sizes() == at::IntArrayRef({B}) && weight->is_contiguous() && weight->scalar_type() == acc &&
                    weight->device() == logits.device(),
                "masked_cross_entropy: weight must be a contiguous (B,) tensor of the accumulation dtype on ",
                logits.device());
  }
  at::Tensor grad = at::empty({B, K, N}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0) return {at::zeros({B}, logits.options().dtype(acc)), grad};
  const int64_t n_blocks = (N + kThreads - 1) / kThreads;
  TORCH_CHECK(B * n_blocks < (int64_t{1} << 31), "masked_cross_entropy: too many pixels for one launch");
  const at::Tensor count = mask.sum(1, /*keepdim=*/false, at::kLong);
  at::Tensor partial = at::empty({B, n_blocks}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_cross_entropy", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    launch<scalar_t, acc_t>(logits, target, mask, count, weight, grad, partial, n_blocks);
  });
  return {partial.sum(1), grad};
}

}  // namespace pyunlearn::cuda

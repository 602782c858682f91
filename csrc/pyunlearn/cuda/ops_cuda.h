// Tensor-level entry points of the CUDA kernels (built only with PYUNLEARN_WITH_CUDA; bound in
// bindings.cpp as the ``cuda_*`` functions of pyunlearn._C). Same contracts as the CPU entry points
// and as pyunlearn/ops/reference.py and pyunlearn/ops/rng.py; tensors are CUDA tensors on one device,
// float32 parameters and gradients for the steps, contiguous where the Python layer says so.
//
// Noise keys are 8 32-bit words (a 256-bit ChaCha20 key), fingerprint keys 2 words, each passed as an
// int64 in [0, 2^32); steps and streams are in [0, 2^32). The clipping steps return the float64 (6,)
// result [status, norm, old_proj, old_sq, new_proj, new_sq] on the device (status: 0 ran, 1 non-finite
// norm, 2 fingerprint mismatch; on a status other than 0 the parameters are not written).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace pyunlearn::cuda {

std::tuple<at::Tensor, at::Tensor> masked_cross_entropy_fwd_bwd(const at::Tensor& logits, const at::Tensor& target,
                                                                const at::Tensor& mask,
                                                                const c10::optional<at::Tensor>& weight);

at::Tensor gradient_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                  double lr, double max_grad_norm, double weight_decay, double sigma,
                                  const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                                  const std::vector<double>& expected_fp);

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma,
                               const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                               const std::vector<double>& expected_fp);

// noise_std = noise_multiplier * max_grad_norm, formed in double by the caller; no noise for noise_std <= 0.
void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, const std::vector<int64_t>& key,
                int64_t step);

void add_noise(const std::vector<at::Tensor>& params, double sigma, const std::vector<int64_t>& key, int64_t step,
               int64_t stream);

// float64 (2,) [proj, sq] on the device: the same doubles as a step's old fingerprint of these params.
at::Tensor fingerprint(const std::vector<at::Tensor>& params, const std::vector<int64_t>& fp_key);

at::Tensor global_norm(const std::vector<at::Tensor>& tensors);

at::Tensor per_sample_sq_norms(const at::Tensor& a, const at::Tensor& g, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation);

// float64 noise of global elements offset .. offset + numel - 1 on CUDA device ``device_index``.
at::Tensor gaussian_noise(int64_t numel, const std::vector<int64_t>& key, int64_t step, int64_t offset,
                          int64_t stream, int64_t device_index);

}  // namespace pyunlearn::cuda

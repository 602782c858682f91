// Tensor-level entry points of the CUDA kernels (built only with PYUNLEARN_WITH_CUDA; bound in
// bindings.cpp as the ``cuda_*`` functions of pyunlearn._C). Same contracts as the CPU entry points
// and as pyunlearn/ops/reference.py; tensors are CUDA tensors on one device, float32 parameters and
// gradients for the steps, contiguous where the Python layer says so.
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
                                  double lr, double max_grad_norm, double weight_decay, double sigma, int64_t seed,
                                  int64_t step);

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma, int64_t seed,
                               int64_t step);

void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, int64_t seed, int64_t step);

void add_noise(const std::vector<at::Tensor>& params, double sigma, int64_t seed, int64_t step, int64_t stream);

at::Tensor global_norm(const std::vector<at::Tensor>& tensors);

at::Tensor per_sample_sq_norms(const at::Tensor& a, const at::Tensor& g, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation);

at::Tensor gaussian_noise(int64_t numel, int64_t seed, int64_t step, int64_t offset, int64_t stream,
                          const at::Device& device);

}  // namespace pyunlearn::cuda

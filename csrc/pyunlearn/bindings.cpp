// Python bindings of pyunlearn._C: tensor checks and conversion to the pointer-level kernels.
// The Python layer (pyunlearn/ops/_registry.py) validates arguments with clear messages first; the
// TORCH_CHECKs here only guard memory safety.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"
#include "philox.h"

#ifdef PYUNLEARN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace pyunlearn {
namespace {

// Bumped whenever a kernel signature or contract changes; the Python loader refuses a stale build.
constexpr int kAbiVersion = 1;

std::vector<ParamSpan> make_spans(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* grads,
                                  const char* what) {
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == params.size(), what, ": got ", params.size(), " params but ", grads->size(),
                " grads");
  }
  std::vector<ParamSpan> spans;
  spans.reserve(params.size());
  uint64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(), what, ": params[", i,
                "] must be a contiguous float32 CPU tensor");
    const float* g = nullptr;
    if (grads != nullptr) {
      const at::Tensor& gt = (*grads)[i];
      TORCH_CHECK(gt.device().is_cpu() && gt.scalar_type() == at::kFloat && gt.is_contiguous(), what,
                  ": grads[", i, "] must be a contiguous float32 CPU tensor");
      TORCH_CHECK(gt.numel() == p.numel(), what, ": grads[", i, "] has ", gt.numel(), " elements, params[", i,
                  "] has ", p.numel());
      g = gt.data_ptr<float>();
    }
    spans.push_back(ParamSpan{p.data_ptr<float>(), g, p.numel(), offset});
    offset += static_cast<uint64_t>(p.numel());
  }
  return spans;
}

NoiseKey key_of(int64_t seed, int64_t step, int64_t stream) {
  TORCH_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), "step must be in [0, 2**32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < (int64_t{1} << 32), "stream must be in [0, 2**32), got ", stream);
  return make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<uint32_t>(stream));
}

// fp32 clip factor exactly as reference.clip_factor: min(1, C / norm) with norm clamped at 1e-30, where
// torch evaluates `C / tensor` as `tensor.reciprocal() * C` (two roundings, not one division).
float clip_factor(float norm, double max_norm) {
  const float c = static_cast<float>(max_norm);
  return norm > c ? (1.0f / std::max(norm, 1e-30f)) * c : 1.0f;
}

at::Tensor scalar_norm(double sumsq) {
  return at::full({}, static_cast<float>(std::sqrt(sumsq)), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor gradient_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                  double lr, double max_grad_norm, double weight_decay, double sigma,
                                  int64_t seed, int64_t step) {
  const auto spans = make_spans(params, &grads, "gradient_clipping_step_");
  StepArgs a;
  a.key = key_of(seed, step, 0);
  const float norm = static_cast<float>(std::sqrt(sum_squares(spans, /*of_grads=*/true)));
  a.lr = static_cast<float>(lr);
  a.factor = clip_factor(norm, max_grad_norm);
  a.wd = static_cast<float>(weight_decay);
  a.sigma = static_cast<float>(sigma);
  apply_step(spans, StepKind::kGradClip, a);
  return at::full({}, norm, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma, int64_t seed,
                               int64_t step) {
  const auto spans = make_spans(params, &grads, "model_clipping_step_");
  StepArgs a;
  a.key = key_of(seed, step, 0);
  a.lr = static_cast<float>(lr);
  a.wd = static_cast<float>(weight_decay);
  // Pass 1 writes y = x - lr (g + wd x) and accumulates |y|^2; pass 2 scales and adds noise. Recomputing
  // y in pass 2 instead (pass 1 read-only) moves the same 5 words per element, and both variants are
  // dominated by the noise (NOTE, measured at 4M params, 1 thread: noise ~10 ms of an ~11.5 ms step), so
  // the simpler variant was kept: it rounds exactly like the reference and pass 2 skips the gradients.
  const float norm = static_cast<float>(std::sqrt(apply_step(spans, StepKind::kModelUpdate, a)));
  a.factor = clip_factor(norm, max_model_norm);
  a.sigma = static_cast<float>(sigma);
  apply_step(spans, StepKind::kScale, a);
  return at::full({}, norm, at::TensorOptions().dtype(at::kFloat));
}

void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, int64_t seed, int64_t step) {
  const auto spans = make_spans(params, &grads, "dpsgd_step_");
  StepArgs a;
  a.key = key_of(seed, step, 0);
  a.lr = static_cast<float>(lr);
  a.sigma = noise_std > 0.0 ? static_cast<float>(noise_std) : 0.0f;
  a.ebs = static_cast<float>(expected_batch_size);
  a.wd = static_cast<float>(weight_decay);
  apply_step(spans, StepKind::kDpsgd, a);
}

void add_noise(const std::vector<at::Tensor>& params, double sigma, int64_t seed, int64_t step, int64_t stream) {
  const auto spans = make_spans(params, nullptr, "add_noise_");
  StepArgs a;
  a.key = key_of(seed, step, stream);
  a.sigma = static_cast<float>(sigma);
  if (sigma != 0.0) apply_step(spans, StepKind::kNoise, a);
}

at::Tensor global_norm(const std::vector<at::Tensor>& tensors) {
  const auto spans = make_spans(tensors, nullptr, "global_norm");
  return scalar_norm(sum_squares(spans, /*of_grads=*/false));
}

at::Tensor gaussian_noise(int64_t numel, int64_t seed, int64_t step, int64_t offset, int64_t stream) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "gaussian_noise: numel and offset must be >= 0");
  const NoiseKey key = key_of(seed, step, stream);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  constexpr int64_t kGrain = 1 << 14;
  at::parallel_for(0, numel, kGrain, [&](int64_t lo, int64_t hi) {
    normal_range(key, static_cast<uint64_t>(offset + lo), hi - lo, dst + lo);
  });
  return out;
}

std::vector<int64_t> philox(int64_t c0, int64_t c1, int64_t c2, int64_t c3, int64_t k0, int64_t k1) {
  for (int64_t v : {c0, c1, c2, c3, k0, k1}) {
    TORCH_CHECK(v >= 0 && v < (int64_t{1} << 32), "philox: words must be in [0, 2**32), got ", v);
  }
  uint32_t a = static_cast<uint32_t>(c0), b = static_cast<uint32_t>(c1), c = static_cast<uint32_t>(c2),
           d = static_cast<uint32_t>(c3);
  philox4x32_10(a, b, c, d, static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
  return {a, b, c, d};
}

std::tuple<at::Tensor, at::Tensor> masked_cross_entropy_fwd_bwd(const at::Tensor& logits, const at::Tensor& target,
                                                                const at::Tensor& mask,
                                                                const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 3 && logits.device().is_cpu(), "masked_cross_entropy: logits must be (B, K, N) on CPU");
  const int64_t B = logits.size(0), K = logits.size(1), N = logits.size(2);
  TORCH_CHECK(K >= 1, "masked_cross_entropy: K must be >= 1");
  TORCH_CHECK(target.sizes() == at::IntArrayRef({B, N}) && target.is_contiguous() && target.device().is_cpu(),
              "masked_cross_entropy: target must be a contiguous (B, N) CPU tensor");
  TORCH_CHECK(mask.sizes() == at::IntArrayRef({B, N}) && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
                  mask.device().is_cpu(),
              "masked_cross_entropy: mask must be a contiguous (B, N) bool CPU tensor");
  MaskedCEArgs a;
  at::ScalarType acc = at::kFloat;
  switch (logits.scalar_type()) {
    case at::kFloat: a.dtype = FloatType::kFloat32; break;
    case at::kDouble: a.dtype = FloatType::kFloat64; acc = at::kDouble; break;
    case at::kBFloat16: a.dtype = FloatType::kBFloat16; break;
    case at::kHalf: a.dtype = FloatType::kFloat16; break;
    default: TORCH_CHECK(false, "masked_cross_entropy: unsupported logits dtype ", logits.scalar_type());
  }
  switch (target.scalar_type()) {
    case at::kLong: a.target_type = IndexType::kInt64; break;
    case at::kInt: a.target_type = IndexType::kInt32; break;
    case at::kByte: a.target_type = IndexType::kUInt8; break;
    default: TORCH_CHECK(false, "masked_cross_entropy: unsupported target dtype ", target.scalar_type());
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.sizes() == at::IntArrayRef({B}) && w.is_contiguous() && w.scalar_type() == acc &&
                    w.device().is_cpu(),
                "masked_cross_entropy: weight must be a contiguous (B,) CPU tensor of the accumulation dtype");
    a.weight = w.data_ptr();
  }
  at::Tensor loss = at::empty({B}, logits.options().dtype(acc));
  at::Tensor grad = at::empty({B, K, N}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  a.logits = logits.data_ptr();
  a.B = B;
  a.K = K;
  a.N = N;
  a.sb = logits.stride(0);
  a.sk = logits.stride(1);
  a.sn = logits.stride(2);
  a.target = target.data_ptr();
  a.mask = mask.data_ptr<bool>();
  a.loss = loss.data_ptr();
  a.grad = grad.data_ptr();
  const int64_t bad = masked_cross_entropy(a);
  TORCH_CHECK_INDEX(bad == 0, "masked_cross_entropy: ", bad, " target values are outside [0, ", K, ")");
  return {loss, grad};
}

}  // namespace
}  // namespace pyunlearn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pyunlearn;
  m.doc() = "pyunlearn fused CPU kernels (see pyunlearn/ops/reference.py for the contracts)";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#ifdef PYUNLEARN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("masked_cross_entropy_fwd_bwd", &masked_cross_entropy_fwd_bwd, py::arg("logits"), py::arg("target"),
        py::arg("mask"), py::arg("weight") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("gradient_clipping_step_", &gradient_clipping_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("max_grad_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("seed"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("model_clipping_step_", &model_clipping_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("max_model_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("seed"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("dpsgd_step_", &dpsgd_step, py::arg("params"), py::arg("grads"), py::arg("lr"), py::arg("noise_std"),
        py::arg("expected_batch_size"), py::arg("weight_decay"), py::arg("seed"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_noise_", &add_noise, py::arg("params"), py::arg("sigma"), py::arg("seed"), py::arg("step"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("global_norm", &global_norm, py::arg("tensors"), py::call_guard<py::gil_scoped_release>());
  m.def("gaussian_noise", &gaussian_noise, py::arg("numel"), py::arg("seed"), py::arg("step"), py::arg("offset"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
#ifdef PYUNLEARN_WITH_CUDA
  // CUDA kernels (csrc/pyunlearn/cuda/): same arguments and contracts, CUDA tensors.
  m.def("cuda_masked_cross_entropy_fwd_bwd", &cuda::masked_cross_entropy_fwd_bwd, py::arg("logits"),
        py::arg("target"), py::arg("mask"), py::arg("weight") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_gradient_clipping_step_", &cuda::gradient_clipping_step, py::arg("params"), py::arg("grads"),
        py::arg("lr"), py::arg("max_grad_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("seed"),
        py::arg("step"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_model_clipping_step_", &cuda::model_clipping_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("max_model_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("seed"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_dpsgd_step_", &cuda::dpsgd_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("noise_std"), py::arg("expected_batch_size"), py::arg("weight_decay"), py::arg("seed"),
        py::arg("step"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_add_noise_", &cuda::add_noise, py::arg("params"), py::arg("sigma"), py::arg("seed"), py::arg("step"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_global_norm", &cuda::global_norm, py::arg("tensors"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_per_sample_sq_norms", &cuda::per_sample_sq_norms, py::arg("a"), py::arg("g"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cuda_gaussian_noise",
      [](int64_t numel, int64_t seed, int64_t step, int64_t offset, int64_t stream, int64_t device_index) {
        return cuda::gaussian_noise(numel, seed, step, offset, stream,
                                    at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
      },
      py::arg("numel"), py::arg("seed"), py::arg("step"), py::arg("offset"), py::arg("stream"),
      py::arg("device_index"), py::call_guard<py::gil_scoped_release>());
#endif
  m.def("philox", &philox, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
        "Philox4x32-10 of one counter (test entry point).");
}

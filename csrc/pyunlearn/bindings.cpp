// Python bindings of pyunlearn._C: tensor checks and conversion to the pointer-level kernels.
// The Python layer (pyunlearn/ops/_registry.py) validates arguments with clear messages first; the
// TORCH_CHECKs here only guard memory safety.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

#include <algorithm>
#include <cmath>

#include "kernels.h"

#ifdef PYUNLEARN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace pyunlearn {
namespace {

// Bumped whenever a kernel signature or contract changes; the Python loader refuses a stale build.
// 2: ChaCha20 keys (8 words) instead of Philox seeds, float64 Box-Muller noise added in double and
//    rounded once, fingerprints and a status in the step results, dpsgd_step_ in double.
constexpr int kAbiVersion = 2;

constexpr int64_t kTwo32 = int64_t{1} << 32;

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

uint32_t word_of(int64_t v, const char* what, const char* name) {
  TORCH_CHECK(v >= 0 && v < kTwo32, what, ": ", name, " words must be in [0, 2**32), got ", v);
  return static_cast<uint32_t>(v);
}

NoiseKey key_of(const std::vector<int64_t>& key, int64_t step, int64_t stream, const char* what) {
  TORCH_CHECK(key.size() == 8, what, ": key must have 8 32-bit words (a 256-bit ChaCha20 key), got ", key.size());
  TORCH_CHECK(step >= 0 && step < kTwo32, what, ": step must be in [0, 2**32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < kTwo32, what, ": stream must be in [0, 2**32), got ", stream);
  NoiseKey k{};
  for (int j = 0; j < 8; ++j) k.k[j] = word_of(key[j], what, "key");
  k.step = static_cast<uint32_t>(step);
  k.stream = static_cast<uint32_t>(stream);
  return k;
}

FpKey fp_key_of(const std::vector<int64_t>& fp_key, const char* what) {
  TORCH_CHECK(fp_key.size() == 2, what, ": fp_key must have 2 32-bit words, got ", fp_key.size());
  return FpKey{word_of(fp_key[0], what, "fp_key"), word_of(fp_key[1], what, "fp_key")};
}

// fp32 clip factor exactly as reference.clip_factor: min(1, C / norm) with norm clamped at 1e-30, where
// torch evaluates `C / tensor` as `tensor.reciprocal() * C` (two roundings, not one division).
float clip_factor(float norm, double max_norm) {
  const float c = static_cast<float>(max_norm);
  return norm > c ? (1.0f / std::max(norm, 1e-30f)) * c : 1.0f;
}

// reference.fingerprint_matches with FP_RTOL = 1e-12 (NaN never matches).
bool fingerprint_matches(const Fingerprint& fp, const std::vector<double>& expected) {
  const double cur[2] = {fp.proj, fp.sq};
  for (int j = 0; j < 2; ++j) {
    const double a = cur[j], b = expected[static_cast<size_t>(j)];
    if (!(std::abs(a - b) <= 1e-12 * std::max(std::abs(a), std::abs(b)) + 1e-300)) return false;
  }
  return true;
}

// Step statuses (reference.STATUS_*).
constexpr double kStatusOk = 0.0, kStatusNonfinite = 1.0, kStatusTampered = 2.0;

double status_of(float norm, const Fingerprint& old_fp, const std::vector<double>& expected_fp) {
  if (!std::isfinite(norm)) return kStatusNonfinite;
  if (!expected_fp.empty() && !fingerprint_matches(old_fp, expected_fp)) return kStatusTampered;
  return kStatusOk;
}

at::Tensor step_result(double status, float norm, const Fingerprint& old_fp, const Fingerprint& new_fp) {
  at::Tensor out = at::empty({6}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = status;
  o[1] = static_cast<double>(norm);
  o[2] = old_fp.proj;
  o[3] = old_fp.sq;
  o[4] = new_fp.proj;
  o[5] = new_fp.sq;
  return out;
}

void check_expected(const std::vector<double>& expected_fp, const char* what) {
  TORCH_CHECK(expected_fp.empty() || expected_fp.size() == 2, what,
              ": expected_fp must be empty or [proj, sq], got ", expected_fp.size(), " values");
}

at::Tensor gradient_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                  double lr, double max_grad_norm, double weight_decay, double sigma,
                                  const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                                  const std::vector<double>& expected_fp) {
  constexpr const char* what = "gradient_clipping_step_";
  const auto spans = make_spans(params, &grads, what);
  StepArgs a;
  a.key = key_of(key, step, 0, what);
  a.fp = fp_key_of(fp_key, what);
  check_expected(expected_fp, what);
  a.lr = static_cast<float>(lr);
  a.wd = static_cast<float>(weight_decay);
  // Pass 1 (read-only): the gradient norm and the fingerprint of the current parameters.
  const ReadPass p1 = read_pass(spans, NormOf::kGrads, a.lr, a.wd, a.fp);
  const float norm = static_cast<float>(std::sqrt(p1.sumsq));
  const double status = status_of(norm, p1.fp, expected_fp);
  if (status != kStatusOk) return step_result(status, norm, p1.fp, p1.fp);
  // Pass 2: update, noise, fingerprint of the new parameters.
  a.factor = clip_factor(norm, max_grad_norm);
  a.sigma = sigma;
  a.grid = release_grid(sigma);
  a.want_fp = true;
  const Fingerprint new_fp = apply_step(spans, StepKind::kGradClip, a);
  return step_result(status, norm, p1.fp, new_fp);
}

at::Tensor model_clipping_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               double lr, double max_model_norm, double weight_decay, double sigma,
                               const std::vector<int64_t>& key, int64_t step, const std::vector<int64_t>& fp_key,
                               const std::vector<double>& expected_fp) {
  constexpr const char* what = "model_clipping_step_";
  const auto spans = make_spans(params, &grads, what);
  StepArgs a;
  a.key = key_of(key, step, 0, what);
  a.fp = fp_key_of(fp_key, what);
  check_expected(expected_fp, what);
  a.lr = static_cast<float>(lr);
  a.wd = static_cast<float>(weight_decay);
  // Pass 1 (read-only): |y| for y = x - lr (g + wd x), and the fingerprint of x. Pass 2 recomputes y (the
  // same float32 operations), so nothing is written unless the step is valid.
  const ReadPass p1 = read_pass(spans, NormOf::kModelUpdate, a.lr, a.wd, a.fp);
  const float norm = static_cast<float>(std::sqrt(p1.sumsq));
  const double status = status_of(norm, p1.fp, expected_fp);
  if (status != kStatusOk) return step_result(status, norm, p1.fp, p1.fp);
  a.factor = clip_factor(norm, max_model_norm);
  a.sigma = sigma;
  a.grid = release_grid(sigma);
  a.want_fp = true;
  const Fingerprint new_fp = apply_step(spans, StepKind::kModelClip, a);
  return step_result(status, norm, p1.fp, new_fp);
}

void dpsgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double lr,
                double noise_std, double expected_batch_size, double weight_decay, const std::vector<int64_t>& key,
                int64_t step) {
  constexpr const char* what = "dpsgd_step_";
  const auto spans = make_spans(params, &grads, what);
  StepArgs a;
  a.key = key_of(key, step, 0, what);
  a.lr_d = lr;
  a.sigma = noise_std > 0.0 ? noise_std : 0.0;  // reference: noise only if std > 0
  a.ebs = expected_batch_size;
  a.wd_d = weight_decay;
  a.grid = release_grid(noise_std > 0.0 ? lr * noise_std / expected_batch_size : 0.0);
  apply_step(spans, StepKind::kDpsgd, a);
}

void add_noise(const std::vector<at::Tensor>& params, double sigma, const std::vector<int64_t>& key, int64_t step,
               int64_t stream) {
  constexpr const char* what = "add_noise_";
  const auto spans = make_spans(params, nullptr, what);
  StepArgs a;
  a.key = key_of(key, step, stream, what);
  a.sigma = sigma;
  a.grid = release_grid(sigma);
  if (sigma != 0.0) apply_step(spans, StepKind::kNoise, a);
}

at::Tensor global_norm(const std::vector<at::Tensor>& tensors) {
  const auto spans = make_spans(tensors, nullptr, "global_norm");
  return at::full({}, static_cast<float>(std::sqrt(sum_squares(spans, /*of_grads=*/false))),
                  at::TensorOptions().dtype(at::kFloat));
}

at::Tensor fingerprint_of(const std::vector<at::Tensor>& params, const std::vector<int64_t>& fp_key) {
  const auto spans = make_spans(params, nullptr, "fingerprint");
  const Fingerprint fp = fingerprint(spans, fp_key_of(fp_key, "fingerprint"));
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = fp.proj;
  out.data_ptr<double>()[1] = fp.sq;
  return out;
}

at::Tensor gaussian_noise(int64_t numel, const std::vector<int64_t>& key, int64_t step, int64_t offset,
                          int64_t stream) {
  TORCH_CHECK(numel >= 0 && offset >= 0, "gaussian_noise: numel and offset must be >= 0, got numel=", numel,
              ", offset=", offset);
  const NoiseKey k = key_of(key, step, stream, "gaussian_noise");
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  constexpr int64_t kGrain = 1 << 14;
  at::parallel_for(0, numel, kGrain, [&](int64_t lo, int64_t hi) {
    normal_range(k, static_cast<uint64_t>(offset + lo), hi - lo, dst + lo);
  });
  return out;
}

// One RFC 8439 block (counter, nonce words) through the vectorised generator (test entry point).
std::vector<int64_t> chacha20_block_words(const std::vector<int64_t>& key, int64_t counter, int64_t nonce0,
                                          int64_t nonce1, int64_t nonce2) {
  constexpr const char* what = "chacha20_block";
  const uint32_t c = word_of(counter, what, "counter"), n0 = word_of(nonce0, what, "nonce");
  NoiseKey k = key_of(key, word_of(nonce1, what, "nonce"), word_of(nonce2, what, "nonce"), what);
  std::vector<uint32_t> w(16 * kNoiseMaxBlocks);
  chacha20_groups(k, (static_cast<uint64_t>(n0) << 32) | c, 1, w.data());
  std::vector<int64_t> out(16);
  for (int j = 0; j < 16; ++j) out[j] = w[static_cast<size_t>(j) * kNoiseMaxBlocks];
  return out;
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
        py::arg("max_grad_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("key"), py::arg("step"),
        py::arg("fp_key"), py::arg("expected_fp"), py::call_guard<py::gil_scoped_release>());
  m.def("model_clipping_step_", &model_clipping_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("max_model_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("key"), py::arg("step"),
        py::arg("fp_key"), py::arg("expected_fp"), py::call_guard<py::gil_scoped_release>());
  m.def("dpsgd_step_", &dpsgd_step, py::arg("params"), py::arg("grads"), py::arg("lr"), py::arg("noise_std"),
        py::arg("expected_batch_size"), py::arg("weight_decay"), py::arg("key"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_noise_", &add_noise, py::arg("params"), py::arg("sigma"), py::arg("key"), py::arg("step"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("global_norm", &global_norm, py::arg("tensors"), py::call_guard<py::gil_scoped_release>());
  m.def("fingerprint", &fingerprint_of, py::arg("params"), py::arg("fp_key"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gaussian_noise", &gaussian_noise, py::arg("numel"), py::arg("key"), py::arg("step"), py::arg("offset"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("chacha20_block", &chacha20_block_words, py::arg("key"), py::arg("counter"), py::arg("nonce0"),
        py::arg("nonce1"), py::arg("nonce2"), "RFC 8439 block function of one block (test entry point).");
#ifdef PYUNLEARN_WITH_CUDA
  // CUDA kernels (csrc/pyunlearn/cuda/): same arguments and contracts, CUDA tensors.
  m.def("cuda_masked_cross_entropy_fwd_bwd", &cuda::masked_cross_entropy_fwd_bwd, py::arg("logits"),
        py::arg("target"), py::arg("mask"), py::arg("weight") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_gradient_clipping_step_", &cuda::gradient_clipping_step, py::arg("params"), py::arg("grads"),
        py::arg("lr"), py::arg("max_grad_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("key"),
        py::arg("step"), py::arg("fp_key"), py::arg("expected_fp"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_model_clipping_step_", &cuda::model_clipping_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("max_model_norm"), py::arg("weight_decay"), py::arg("sigma"), py::arg("key"), py::arg("step"),
        py::arg("fp_key"), py::arg("expected_fp"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_dpsgd_step_", &cuda::dpsgd_step, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("noise_std"), py::arg("expected_batch_size"), py::arg("weight_decay"), py::arg("key"),
        py::arg("step"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_add_noise_", &cuda::add_noise, py::arg("params"), py::arg("sigma"), py::arg("key"), py::arg("step"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_global_norm", &cuda::global_norm, py::arg("tensors"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_fingerprint", &cuda::fingerprint, py::arg("params"), py::arg("fp_key"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_per_sample_sq_norms", &cuda::per_sample_sq_norms, py::arg("a"), py::arg("g"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_gaussian_noise", &cuda::gaussian_noise, py::arg("numel"), py::arg("key"), py::arg("step"),
        py::arg("offset"), py::arg("stream"), py::arg("device_index"), py::call_guard<py::gil_scoped_release>());
#endif
}

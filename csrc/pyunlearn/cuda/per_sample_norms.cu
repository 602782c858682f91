// CUDA per-sample weight-gradient norms of a 2-d convolution (groups 1), reduced in registers.
//
// The CUDA twin of triton_kernels/per_sample_norms.py (same contract as
// pyunlearn.ops.reference.per_sample_sq_norms): for sample b, G_b[p, (c, kh, kw)] =
//   sum_{oh, ow} g[b, p, oh, ow] * a[b, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
// and the result is ||G_b||_F^2. A block owns one kTile x kTile tile of G_b (output channels x
// (c, kh, kw)) and walks the output positions kTile at a time: it stages the g tile and an implicit
// im2col tile of a in shared memory (zero outside the input; no unfold buffer), and each thread
// accumulates a 2 x 2 sub-tile in registers. The tile is then squared and summed into one partial per
// block; the per-sample partials are summed in a fixed order (deterministic, no atomics). Nothing of
// size B x P x D is written.
//
// Float32 accumulation with --fmad=false (separate multiply and add): the norms decide DP-SGD's clip
// factors. NOTE: a plain shared-memory tiling, not tuned on a GPU (none was available).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops_cuda.h"

namespace pyunlearn::cuda {
namespace {

constexpr int kTile = 32;               // G_b tile (P x D) per block, and positions per stage
constexpr int kSub = 2;                 // each thread: kSub x kSub outputs
constexpr int kSide = kTile / kSub;     // 16 x 16 threads
static_assert(kSide * kSide == kThreads, "one thread per kSub x kSub sub-tile");

struct Conv {
  int64_t C, H, W, P, OW, T, KH, KW;
  int64_t sab, sac, sah, saw, sgb, sgp, sgh, sgw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t tiles, tiles_d;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) per_sample_sq_norm_kernel(const scalar_t* __restrict__ a,
                                                                      const scalar_t* __restrict__ g, Conv cv,
                                                                      float* __restrict__ partial) {
  __shared__ float g_s[kTile][kTile + 1];  // [p][t]
  __shared__ float a_s[kTile][kTile + 1];  // [t][d]
  const int64_t b = blockIdx.x / cv.tiles;
  const int64_t tile = blockIdx.x % cv.tiles;
  const int64_t p0 = (tile / cv.tiles_d) * kTile;
  const int64_t d0 = (tile % cv.tiles_d) * kTile;
  const int64_t D = cv.C * cv.KH * cv.KW;
  const scalar_t* a_b = a + b * cv.sab;
  const scalar_t* g_b = g + b * cv.sgb;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  float acc[kSub][kSub] = {};
  for (int64_t t0 = 0; t0 < cv.T; t0 += kTile) {
    // Stage: each thread loads 4 elements of each tile (kTile * kTile / kThreads).
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int row = i / kTile, col = i % kTile;
      // g tile: row = p, col = t (consecutive threads: consecutive positions)
      const int64_t p = p0 + row, t = t0 + col;
      float gv = 0.0f;
      if (p < cv.P && t < cv.T) {
        gv = static_cast<float>(g_b[p * cv.sgp + (t / cv.OW) * cv.sgh + (t % cv.OW) * cv.sgw]);
      }
      g_s[row][col] = gv;
      // a tile: row = t, col = d = (c, kh, kw)
      const int64_t ta = t0 + row, d = d0 + col;
      float av = 0.0f;
      if (ta < cv.T && d < D) {
        const int64_t c = d / (cv.KH * cv.KW), kh = (d / cv.KW) % cv.KH, kw = d % cv.KW;
        const int64_t ih = (ta / cv.OW) * cv.stride_h - cv.pad_h + kh * cv.dil_h;
        const int64_t iw = (ta % cv.OW) * cv.stride_w - cv.pad_w + kw * cv.dil_w;
        if (ih >= 0 && ih < cv.H && iw >= 0 && iw < cv.W) {
          av = static_cast<float>(a_b[c * cv.sac + ih * cv.sah + iw * cv.saw]);
        }
      }
      a_s[row][col] = av;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += g_s[ty * kSub + i][k] * a_s[k][tx * kSub + j];
      }
    }
    __syncthreads();
  }
  float sq = 0.0f;  // rows/columns past P or D hold exact zeros
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
#pragma unroll
    for (int j = 0; j < kSub; ++j) sq += acc[i][j] * acc[i][j];
  }
  const float total = block_sum(sq);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

}  // namespace

at::Tensor per_sample_sq_norms(const at::Tensor& a, const at::Tensor& g, std::vector<int64_t> kernel_size,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation) {
  TORCH_CHECK(a.dim() == 4 && g.dim() == 4 && a.is_cuda() && g.device() == a.device(),
              "per_sample_sq_norms: a (B, C, H, W) and g (B, P, OH, OW) must be CUDA tensors on one device");
  TORCH_CHECK(a.scalar_type() == g.scalar_type() && a.scalar_type() != at::kDouble,
              "per_sample_sq_norms: a and g must have one dtype, float32, float16 or bfloat16");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "per_sample_sq_norms: kernel_size, stride, padding and dilation need 2 values each");
  TORCH_CHECK(a.size(0) == g.size(0), "per_sample_sq_norms: a and g have different batch sizes");
  const c10::cuda::CUDAGuard guard(a.device());
  Conv cv{};
  cv.C = a.size(1);
  cv.H = a.size(2);
  cv.W = a.size(3);
  cv.P = g.size(1);
  cv.OW = g.size(3);
  cv.T = g.size(2) * g.size(3);
  cv.KH = kernel_size[0];
  cv.KW = kernel_size[1];
  cv.sab = a.stride(0), cv.sac = a.stride(1), cv.sah = a.stride(2), cv.saw = a.stride(3);
  cv.sgb = g.stride(0), cv.sgp = g.stride(1), cv.sgh = g.stride(2), cv.sgw = g.stride(3);
  cv.stride_h = stride[0], cv.stride_w = stride[1];
  cv.pad_h = padding[0], cv.pad_w = padding[1];
  cv.dil_h = dilation[0], cv.dil_w = dilation[1];
  const int64_t B = a.size(0);
  const int64_t tiles_p = (cv.P + kTile - 1) / kTile;
  cv.tiles_d = (cv.C * cv.KH * cv.KW + kTile - 1) / kTile;
  cv.tiles = tiles_p * cv.tiles_d;
  at::Tensor partial = at::empty({B, cv.tiles}, a.options().dtype(at::kFloat));  // every block writes its own
  if (B == 0 || cv.tiles == 0 || cv.T == 0) return at::zeros({B}, a.options().dtype(at::kFloat));
  TORCH_CHECK(B * cv.tiles < (int64_t{1} << 31), "per_sample_sq_norms: too many tiles for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "per_sample_sq_norms", [&] {  // not double: checked
    per_sample_sq_norm_kernel<scalar_t><<<static_cast<unsigned>(B * cv.tiles), kThreads, 0, current_stream()>>>(
        a.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), cv, partial.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1);
}

}  // namespace pyunlearn::cuda

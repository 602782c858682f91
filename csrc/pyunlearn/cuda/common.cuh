// Small device helpers shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include <cstdint>

namespace pyunlearn::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here

// Sum of v over the block; the result is valid in thread 0. Fixed reduction tree: deterministic.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  return Reduce(storage).Sum(v);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace pyunlearn::cuda

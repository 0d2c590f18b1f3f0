// Small helpers shared by the fusedres CUDA kernels. Only c10/cuda headers: ATen/cuda/CUDAContext.h
// would pull in cuBLAS headers that a CPU-only torch wheel does not ship.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../bn_common.h"

namespace fusedres {
namespace cuda {

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

inline int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Chan et al.'s parallel merge of (count, mean, M2) summaries: exact for any split of the data,
// and free of the cancellation of sum(x^2) - n*mean^2 when |mean| >> std.
template <typename acc_t>
__device__ __forceinline__ void welford_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t n_b, acc_t mean_b,
                                              acc_t m2_b) {
  const acc_t n_new = n + n_b;
  if (n_new == acc_t(0)) return;
  const acc_t delta = mean_b - mean;
  const acc_t w_b = n_b / n_new;
  mean += delta * w_b;
  m2 += m2_b + delta * delta * n * w_b;
  n = n_new;
}

// Launch shape of a per-channel reduction over [outer, C, inner] (see bn_common.h):
// blockDim = (threads_c, threads_r), grid = (ceil(C / threads_c), splits). NCHW (inner > 1): one
// channel per block and 256 threads along a plane, so a warp reads 32 consecutive values.
// channels_last: 32 channels x 8 rows, so a warp reads 32 consecutive channels of one row.
struct ReduceShape {
  dim3 block;
  dim3 grid;
  int64_t rows_per_split;
};

inline ReduceShape reduce_shape(const ChannelView& v, int device) {
  ReduceShape s;
  s.block = v.inner > 1 ? dim3(1, 256) : dim3(32, 8);
  const int64_t c_blocks = (v.channels + s.block.x - 1) / s.block.x;
  // About 4 blocks per multiprocessor keep every SM streaming; each split must still give every
  // thread along y a few rows to amortize the final block reduction.
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessor_count(device));
  const int64_t min_rows = 16 * static_cast<int64_t>(s.block.y);
  int64_t splits = std::max<int64_t>(1, target_blocks / std::max<int64_t>(1, c_blocks));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, v.count() / min_rows));
  splits = std::min<int64_t>(splits, 65535);
  s.rows_per_split = (v.count() + splits - 1) / splits;
  s.grid = dim3(static_cast<unsigned>(c_blocks), static_cast<unsigned>((v.count() + s.rows_per_split - 1) / s.rows_per_split));
  return s;
}

__host__ __device__ __forceinline__ int64_t storage_index(int64_t row, int64_t c, int64_t C, int64_t inner) {
  const int64_t o = row / inner;
  return (o * C + c) * inner + (row - o * inner);
}

// Elementwise kernels move VEC values per load/store when every pointer is VEC-aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

inline int elementwise_vec(int64_t numel, size_t elem_size, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / elem_size);  // 16-byte accesses
  while (vec > 1) {
    bool ok = numel % vec == 0;
    for (const void* p : ptrs)
      if (p && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) != 0) ok = false;
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

inline dim3 elementwise_grid(int64_t numel, int vec, int threads, int device) {
  const int64_t packs = (numel / vec + threads - 1) / threads;
  const int64_t cap = 8 * static_cast<int64_t>(multiprocessor_count(device));  // grid-stride beyond
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(packs, cap * 32))));
}

}  // namespace cuda
}  // namespace fusedres

// Per-channel reduction over an [outer, C, inner] array on the CPU, in double precision.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../bn_common.h"

namespace fusedres {
namespace cpu {

// Adds, for every storage index i of channel c, contribution(c, i, acc, stride) into
// acc[0], acc[stride], ..., acc[(K-1)*stride] and returns the per-channel totals as [K * C].
// NCHW (inner > 1): one task per channel over contiguous planes, local accumulators (stride 1).
// channels_last (inner == 1): one task per chunk of rows with [K][C] accumulators (stride C), so
// the inner loop over channels walks contiguous memory on both sides and vectorizes.
template <int K, typename Contribution>
std::vector<double> reduce_per_channel(const ChannelView& v, const Contribution& contribution) {
  const int64_t C = v.channels;
  std::vector<double> totals(K * C, 0.0);
  if (v.inner > 1) {
    at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        double acc[K] = {};
        for (int64_t o = 0; o < v.outer; ++o) {
          const int64_t base = (o * C + c) * v.inner;
          for (int64_t k = 0; k < v.inner; ++k) contribution(c, base + k, acc, 1);
        }
        for (int j = 0; j < K; ++j) totals[j * C + c] = acc[j];
      }
    });
    return totals;
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(v.outer, at::get_num_threads() * 4));
  const int64_t rows_per_chunk = (v.outer + chunks - 1) / chunks;
  std::vector<double> partial(chunks * K * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t ch_begin, int64_t ch_end) {
    for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
      double* acc = partial.data() + ch * K * C;  // [K][C] for this chunk
      const int64_t o_end = std::min(v.outer, (ch + 1) * rows_per_chunk);
      for (int64_t o = ch * rows_per_chunk; o < o_end; ++o)
        for (int64_t c = 0; c < C; ++c) contribution(c, o * C + c, acc + c, C);
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t j = 0; j < K * C; ++j) totals[j] += partial[ch * K * C + j];
  return totals;
}

// Calls f(c, i) for every storage index i (channel c), in parallel, with the innermost loop over
// contiguous memory so the compiler can vectorize it: channels of one row (channels_last) or
// positions of one plane (NCHW). f must be a small inlinable lambda.
template <typename F>
void for_each_element(const ChannelView& v, const F& f) {
  const int64_t C = v.channels;
  if (v.inner == 1) {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const int64_t base = o * C;
        for (int64_t c = 0; c < C; ++c) f(c, base + c);
      }
    });
    return;
  }
  at::parallel_for(0, v.outer * C, std::max<int64_t>(1, 32768 / v.inner), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t c = p % C, base = p * v.inner;
      for (int64_t k = 0; k < v.inner; ++k) f(c, base + k);
    }
  });
}

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

}  // namespace cpu
}  // namespace fusedres

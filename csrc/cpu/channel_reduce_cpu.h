// Per-channel reduction over an [outer, C, inner] array on the CPU, in double precision.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../bn_common.h"

namespace fusedres {
namespace cpu {

// Adds, for every storage index i of channel c, contribution(c, i, acc) into acc[0..K) and
// returns the per-channel totals as a [K * C] vector. NCHW (inner > 1): one task per channel,
// reading contiguous planes. channels_last (inner == 1): one task per chunk of rows, each with
// its own [K, C] accumulators, summed at the end (a per-channel loop would stride by C).
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
          for (int64_t k = 0; k < v.inner; ++k) contribution(c, base + k, acc);
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
      double* acc_c = partial.data() + ch * K * C;  // [C][K] for this chunk
      const int64_t o_end = std::min(v.outer, (ch + 1) * rows_per_chunk);
      for (int64_t o = ch * rows_per_chunk; o < o_end; ++o)
        for (int64_t c = 0; c < C; ++c) contribution(c, o * C + c, acc_c + c * K);
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < K; ++j) totals[j * C + c] += partial[(ch * C + c) * K + j];
  return totals;
}

// Calls body(c, begin, end) over runs of storage indices [begin, end) that share channel c,
// in parallel; a run is one NCHW plane (inner values) or one channels_last element.
template <typename Body>
void for_each_channel_run(const ChannelView& v, const Body& body) {
  const int64_t planes = v.outer * v.channels;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, v.inner));
  at::parallel_for(0, planes, grain, [&](int64_t p_begin, int64_t p_end) {
    int64_t c = p_begin % v.channels;
    for (int64_t p = p_begin; p < p_end; ++p) {
      body(c, p * v.inner, (p + 1) * v.inner);
      if (++c == v.channels) c = 0;
    }
  });
}

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

}  // namespace cpu
}  // namespace fusedres

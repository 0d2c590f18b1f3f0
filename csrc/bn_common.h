// Shared by the CPU and CUDA implementations of the fusedres BatchNorm ops.
//
// Every op sees its 4-D activation as a dense [outer, C, inner] array:
//   NCHW contiguous:      outer = N,       inner = H * W
//   channels_last (NHWC): outer = N * H*W, inner = 1
// so one indexing rule, offset = (o * C + c) * inner + k, serves both memory formats, and an
// elementwise kernel finds the channel of storage index i as (i / inner) % C.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

namespace fusedres {

struct ChannelView {
  int64_t outer;  // N (NCHW) or N*H*W (channels_last)
  int64_t channels;
  int64_t inner;  // H*W (NCHW) or 1 (channels_last)
  int64_t numel() const { return outer * channels * inner; }
  int64_t count() const { return outer * inner; }  // values per channel
};

inline ChannelView channel_view(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "fusedres: ", name, " must have at least 2 dimensions [N, C, ...], got ",
              x.dim());
  const int64_t channels = x.size(1);
  ChannelView v{0, channels, 1};
  if (x.is_contiguous()) {
    v.inner = 1;
    for (int64_t d = 2; d < x.dim(); ++d) v.inner *= x.size(d);
    v.outer = x.size(0);
  } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    v.inner = 1;
    v.outer = x.size(0) * x.size(2) * x.size(3);
  } else {
    TORCH_CHECK(false, "fusedres: ", name,
                " must be contiguous in NCHW or channels_last memory format, got strides ",
                x.strides());
  }
  return v;
}

// Output allocation. With FUSEDRES_POISON_OUTPUTS=1 (the test suite sets it) outputs start as NaN,
// so an element a kernel fails to write shows up in the comparison with the reference.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("FUSEDRES_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline at::Tensor new_output_like(const at::Tensor& ref) {
  auto out = at::empty_like(ref);
  if (poison_outputs() && out.numel() > 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// A fresh tensor a kernel fills in whole (NaN under FUSEDRES_POISON_OUTPUTS=1).
inline at::Tensor new_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poison_outputs() ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options)
                          : at::empty(sizes, options);
}

inline at::Tensor new_channel_output(const at::Tensor& ref, at::ScalarType dtype) {
  return new_scratch({ref.size(1)}, ref.options().dtype(dtype));
}

inline void check_same_layout(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fusedres: ", name, " must have shape ", ref.sizes(),
              ", got ", t.sizes());
  // Same rule as fusedres/ops/layout.py:same_layout: strides of size-1 dims may differ freely.
  const bool both_nchw = ref.is_contiguous() && t.is_contiguous();
  const bool both_nhwc = ref.dim() == 4 && ref.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                         t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(both_nchw || both_nhwc, "fusedres: ", name,
              " must have the same memory format as input: input strides ", ref.strides(), ", ", name,
              " strides ", t.strides());
  TORCH_CHECK(t.device() == ref.device(), "fusedres: ", name, " is on ", t.device(),
              " but input is on ", ref.device());
}

inline void check_channel_vector(const at::Tensor& ref, const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == ref.size(1), "fusedres: ", name,
              " must be a 1-D tensor of ", ref.size(1), " per-channel values, got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, "fusedres: ", name,
              " must be float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(v.device() == ref.device(), "fusedres: ", name, " is on ", v.device(),
              " but input is on ", ref.device());
  TORCH_CHECK(v.is_contiguous(), "fusedres: ", name, " must be contiguous");
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fusedres: ", name, " must be float32, float64, float16 or bfloat16, got ", t);
}

// Per-channel statistics are accumulated in float32, or float64 for float64 input.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The per-channel sums a BatchNorm backward reduction produced: [C], or [T, C] partial rows (a
// conv kernel's per-tile sums) that bn_backward_finalize adds up; float32 / float64 like invstd.
struct BackwardSums {
  int64_t rows;
  int64_t channels;
};

inline BackwardSums check_backward_sums(const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                                        const at::Tensor& invstd, const at::Tensor& scale) {
  TORCH_CHECK(invstd.dim() == 1 && scale.sizes() == invstd.sizes(), "fusedres: invstd and scale must be [C], got ",
              invstd.sizes(), " and ", scale.sizes());
  const int64_t C = invstd.size(0);
  TORCH_CHECK((sum_dz.dim() == 1 || sum_dz.dim() == 2) && sum_dz.size(-1) == C && sum_dz.sizes() == sum_dz_xmu.sizes(),
              "fusedres: sum_dz and sum_dz_xmu must be [C] or [T, C] with C = ", C, ", got ", sum_dz.sizes(),
              " and ", sum_dz_xmu.sizes());
  for (const auto* t : {&sum_dz, &sum_dz_xmu, &invstd, &scale}) {
    TORCH_CHECK(t->scalar_type() == invstd.scalar_type() && t->is_contiguous() && t->device() == invstd.device(),
                "fusedres: bn_backward_finalize takes contiguous ", invstd.scalar_type(), " tensors on ",
                invstd.device());
  }
  return {sum_dz.dim() == 2 ? sum_dz.size(0) : 1, C};
}

inline void check_running(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                          const c10::optional<at::Tensor>& running_var) {
  for (const auto* rt : {&running_mean, &running_var}) {
    if (!rt->has_value()) continue;
    const auto& r = **rt;
    TORCH_CHECK(r.dim() == 1 && r.size(0) == x.size(1),
                "fusedres: running statistics must have shape [", x.size(1), "], got ", r.sizes());
    TORCH_CHECK(r.device() == x.device(), "fusedres: running statistics are on ", r.device(),
                " but input is on ", x.device());
  }
}

}  // namespace fusedres

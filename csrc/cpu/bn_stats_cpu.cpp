// BatchNorm batch statistics on the CPU.
#include "channel_reduce_cpu.h"

namespace fusedres {
namespace cpu {
namespace {

// Shifted sums in double: s1 = sum(x - p), s2 = sum((x - p)^2) with the pivot p = the channel's
// first value, then var = s2/n - (s1/n)^2. The pivot lies within a few standard deviations of the
// mean, so the subtraction does not cancel for data such as 1e3 + N(0, 1).
template <typename scalar_t>
void bn_stats_kernel(const at::Tensor& x, const ChannelView& v, at::Tensor& mean, at::Tensor& var) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<double> pivot(v.channels);
  for (int64_t c = 0; c < v.channels; ++c) pivot[c] = static_cast<double>(xp[c * v.inner]);
  auto sums = reduce_per_channel<2>(v, [&](int64_t c, int64_t i, double* acc, int64_t stride) {
    const double d = static_cast<double>(xp[i]) - pivot[c];
    acc[0] += d;
    acc[stride] += d * d;
  });
  const double n = static_cast<double>(v.count());
  auto mean_d = at::empty({v.channels}, mean.options().dtype(at::kDouble));
  auto var_d = at::empty({v.channels}, mean.options().dtype(at::kDouble));
  double* mp = mean_d.data_ptr<double>();
  double* vp = var_d.data_ptr<double>();
  for (int64_t c = 0; c < v.channels; ++c) {
    const double shifted_mean = sums[c] / n;
    mp[c] = pivot[c] + shifted_mean;
    vp[c] = std::max(sums[v.channels + c] / n - shifted_mean * shifted_mean, 0.0);
  }
  mean.copy_(mean_d);
  var.copy_(var_d);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input, double eps,
                                                const c10::optional<at::Tensor>& running_mean,
                                                const c10::optional<at::Tensor>& running_var,
                                                double momentum) {
  check_float_input(input, "input");
  check_running(input, running_mean, running_var);
  const ChannelView v = channel_view(input, "input");
  TORCH_CHECK(v.count() > 0, "fusedres: bn_stats needs at least one value per channel, got input of shape ",
              input.sizes());
  auto opts = input.options().dtype(stats_dtype(input));
  auto mean = new_channel_output(input, stats_dtype(input));
  auto var = new_channel_output(input, stats_dtype(input));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cpu",
                                  [&] { bn_stats_kernel<scalar_t>(input, v, mean, var); });
  update_running_stats(running_mean, running_var, mean, var, v.count(), momentum);
  auto invstd = (var + eps).rsqrt_();
  return {mean, invstd};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres_kernels, CPU, m) { m.impl("bn_stats", &cpu::bn_stats_cpu); }

}  // namespace fusedres

// The C++ CPU kernels of BatchNorm's statistics and backward bookkeeping, compiled twice like
// bn_act_cpu_kernels.h (baseline x86-64 in bn_stats_cpu.cpp, AVX2 in avx2.cpp), each in its
// namespace FUSEDRES_CPU_ISA.
#ifndef FUSEDRES_CPU_ISA
#error "define FUSEDRES_CPU_ISA (the namespace of this build of the kernels) before including this file"
#endif

namespace fusedres {
namespace cpu {
namespace FUSEDRES_CPU_ISA {


// Shifted sums in double: s1 = sum(x - p), s2 = sum((x - p)^2) with the pivot p = the channel's
// first value, then var = s2/n - (s1/n)^2. The pivot lies within a few standard deviations of the
// mean, so the subtraction does not cancel for data such as 1e3 + N(0, 1). The per-channel
// bookkeeping (1/sqrt(var + eps), the running update) is a loop over C here: no ATen op, so a
// BatchNorm's statistics are one op call.
template <typename scalar_t>
void bn_stats_kernel(const at::Tensor& x, const ChannelView& v, std::vector<double>& mean, std::vector<double>& var) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<double> pivot(v.channels);
  for (int64_t c = 0; c < v.channels; ++c) pivot[c] = static_cast<double>(xp[c * v.inner]);
  auto sums = reduce_per_channel<2>(v, [&](int64_t c, int64_t i, double* acc, int64_t stride) {
    const double d = static_cast<double>(xp[i]) - pivot[c];
    acc[0] += d;
    acc[stride] += d * d;
  });
  const double n = static_cast<double>(v.count());
  for (int64_t c = 0; c < v.channels; ++c) {
    const double shifted_mean = sums[c] / n;
    mean[c] = pivot[c] + shifted_mean;
    var[c] = std::max(sums[v.channels + c] / n - shifted_mean * shifted_mean, 0.0);
  }
}

// mean, invstd = 1/sqrt(var + eps) and nn.BatchNorm2d's running update, in the statistics dtype
// acc_t (as the reference rounds: the moments first, then each product):
//   running_mean = (1 - f) * running_mean + f * mean;  running_var likewise with var * n / (n - 1)
template <typename acc_t>
void finalize_stats(const std::vector<double>& mean_d, const std::vector<double>& var_d, int64_t count, double eps,
                    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                    double momentum, at::Tensor& mean, at::Tensor& invstd) {
  const int64_t C = static_cast<int64_t>(mean_d.size());
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* ip = invstd.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    mp[c] = static_cast<acc_t>(mean_d[c]);
    ip[c] = acc_t(1) / std::sqrt(static_cast<acc_t>(var_d[c]) + static_cast<acc_t>(eps));
  }
  if (!running_mean.has_value()) return;
  TORCH_CHECK(count > 1, "fusedres: the running variance needs more than 1 value per channel");
  const acc_t keep = static_cast<acc_t>(1.0 - momentum), f = static_cast<acc_t>(momentum);
  const acc_t f_unbiased = static_cast<acc_t>(momentum * static_cast<double>(count) / static_cast<double>(count - 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(), "bn_running_update", [&] {
    scalar_t* rm = running_mean->mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var->mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<scalar_t>(static_cast<acc_t>(rm[c]) * keep + mp[c] * f);
      rv[c] = static_cast<scalar_t>(static_cast<acc_t>(rv[c]) * keep + static_cast<acc_t>(var_d[c]) * f_unbiased);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input, double eps,
                                                const c10::optional<at::Tensor>& running_mean,
                                                const c10::optional<at::Tensor>& running_var,
                                                double momentum) {
  check_float_input(input, "input");
  check_running(input, running_mean, running_var);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "fusedres: running_mean and running_var must be given together");
  for (const auto* r : {&running_mean, &running_var})
    if (r->has_value()) TORCH_CHECK((*r)->is_contiguous(), "fusedres: running statistics must be contiguous");
  const ChannelView v = channel_view(input, "input");
  TORCH_CHECK(v.count() > 0, "fusedres: bn_stats needs at least one value per channel, got input of shape ",
              input.sizes());
  std::vector<double> mean_d(v.channels), var_d(v.channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cpu",
                                  [&] { bn_stats_kernel<scalar_t>(input, v, mean_d, var_d); });
  auto mean = new_channel_output(input, stats_dtype(input));
  auto invstd = new_channel_output(input, stats_dtype(input));
  if (stats_dtype(input) == at::kDouble) {
    finalize_stats<double>(mean_d, var_d, v.count(), eps, running_mean, running_var, momentum, mean, invstd);
  } else {
    finalize_stats<float>(mean_d, var_d, v.count(), eps, running_mean, running_var, momentum, mean, invstd);
  }
  return {mean, invstd};
}

// BatchNorm's per-channel backward bookkeeping in one loop over C (see csrc/fusedres.cpp).
template <typename acc_t>
void bn_backward_finalize_kernel(const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, const at::Tensor& invstd,
                                 const at::Tensor& scale, double count, bool batch_stats, int64_t rows, int64_t C,
                                 at::Tensor& grad_gamma, at::Tensor& grad_beta, at::Tensor& coef_xmu,
                                 at::Tensor& coef_c) {
  const acc_t* s1 = sum_dz.const_data_ptr<acc_t>();
  const acc_t* s2 = sum_dz_xmu.const_data_ptr<acc_t>();
  const acc_t* is = invstd.const_data_ptr<acc_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  acc_t* gg = grad_gamma.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_beta.mutable_data_ptr<acc_t>();
  acc_t* cx = coef_xmu.mutable_data_ptr<acc_t>();
  acc_t* cc = coef_c.mutable_data_ptr<acc_t>();
  const acc_t n = static_cast<acc_t>(count);
  for (int64_t c = 0; c < C; ++c) {
    acc_t a = 0, b = 0;
    for (int64_t t = 0; t < rows; ++t) {
      a += s1[t * C + c];
      b += s2[t * C + c];
    }
    gg[c] = b * is[c];
    gb[c] = a;
    // the reference's order of operations: -scale * invstd * invstd * sum / count
    cx[c] = batch_stats ? -sc[c] * is[c] * is[c] * b / n : acc_t(0);
    cc[c] = batch_stats ? -sc[c] * a / n : acc_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finalize_cpu(
    const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, const at::Tensor& invstd, const at::Tensor& scale,
    double count, bool batch_stats) {
  const BackwardSums s = check_backward_sums(sum_dz, sum_dz_xmu, invstd, scale);
  auto opts = invstd.options();
  auto grad_gamma = new_scratch({s.channels}, opts), grad_beta = new_scratch({s.channels}, opts);
  auto coef_xmu = new_scratch({s.channels}, opts), coef_c = new_scratch({s.channels}, opts);
  if (invstd.scalar_type() == at::kDouble) {
    bn_backward_finalize_kernel<double>(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats, s.rows, s.channels,
                                        grad_gamma, grad_beta, coef_xmu, coef_c);
  } else {
    bn_backward_finalize_kernel<float>(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats, s.rows, s.channels,
                                       grad_gamma, grad_beta, coef_xmu, coef_c);
  }
  return {grad_gamma, grad_beta, coef_xmu, coef_c};
}


}  // namespace FUSEDRES_CPU_ISA
}  // namespace cpu
}  // namespace fusedres

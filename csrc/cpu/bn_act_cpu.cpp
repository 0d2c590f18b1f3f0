// Normalize-activate y = act((x - mean) * scale + shift + residual) and its backward, on the CPU.
#include "channel_reduce_cpu.h"

namespace fusedres {
namespace cpu {
namespace {

// Per-channel parameter vectors as acc_t, with the defaults of absent ones (mean 0, scale 1).
template <typename acc_t>
std::vector<acc_t> channel_params(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t.has_value()) {
    auto d = t->to(at::kDouble).contiguous();
    const double* p = d.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

at::Tensor bn_act_forward_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& mean,
                              const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& residual, bool relu) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  if (mean) check_channel_vector(input, *mean, "mean");
  if (scale) check_channel_vector(input, *scale, "scale");
  check_channel_vector(input, shift, "shift");
  if (residual) check_same_layout(input, *residual, "residual");
  auto out = new_output_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto mu = channel_params<acc_t>(mean, v.channels, 0);
    const auto sc = channel_params<acc_t>(scale, v.channels, 1);
    const auto sh = channel_params<acc_t>(shift, v.channels, 0);
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::Tensor res;
    if (residual) res = residual->to(input.scalar_type());
    const scalar_t* rp = residual ? res.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* mup = mu.data();
    const acc_t* scp = sc.data();
    const acc_t* shp = sh.data();
    for_each_element(v, [&](int64_t c, int64_t i) {
      acc_t z = (static_cast<acc_t>(xp[i]) - mup[c]) * scp[c] + shp[c];
      if (rp) z += static_cast<acc_t>(rp[i]);
      // z < 0, not !(z > 0): ReLU passes NaN through, as torch.relu does.
      yp[i] = static_cast<scalar_t>(relu && z < acc_t(0) ? acc_t(0) : z);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, const c10::optional<at::Tensor>& output,
    bool relu, bool write_grad_z) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "fusedres: grad_output dtype ",
              grad_output.scalar_type(), " must match input dtype ", input.scalar_type());
  check_channel_vector(input, mean, "mean");
  check_channel_vector(input, scale, "scale");
  check_channel_vector(input, shift, "shift");
  if (output) check_same_layout(input, *output, "output");
  auto grad_z = write_grad_z ? new_output_like(grad_output) : at::empty({0}, grad_output.options());
  auto sum_dz = new_channel_output(input, stats_dtype(input));
  auto sum_dz_xmu = new_channel_output(input, stats_dtype(input));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto mu = channel_params<acc_t>(mean, v.channels, 0);
    const auto sc = channel_params<acc_t>(scale, v.channels, 1);
    const auto sh = channel_params<acc_t>(shift, v.channels, 0);
    const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    at::Tensor out_cast;
    if (output) out_cast = output->to(input.scalar_type());
    const scalar_t* op = output ? out_cast.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dzp = write_grad_z ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    auto sums = reduce_per_channel<2>(v, [&](int64_t c, int64_t i, double* acc, int64_t stride) {
      const acc_t xmu = static_cast<acc_t>(xp[i]) - mu[c];
      acc_t dz = static_cast<acc_t>(gp[i]);
      if (relu) {
        const bool active = op ? static_cast<acc_t>(op[i]) > 0 : xmu * sc[c] + sh[c] > 0;
        if (!active) dz = 0;
      }
      if (dzp) dzp[i] = static_cast<scalar_t>(dz);
      acc[0] += static_cast<double>(dz);
      acc[stride] += static_cast<double>(dz) * static_cast<double>(xmu);
    });
    auto sums_d = at::from_blob(sums.data(), {2, v.channels}, at::kDouble);
    sum_dz.copy_(sums_d[0]);
    sum_dz_xmu.copy_(sums_d[1]);
  });
  return {sum_dz, sum_dz_xmu, grad_z};
}

at::Tensor bn_act_backward_elementwise_cpu(const at::Tensor& grad, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& coef_xmu,
                                           const at::Tensor& coef_c, bool relu) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad, "grad");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "fusedres: grad dtype ", grad.scalar_type(),
              " must match input dtype ", input.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                {scale, "scale"}, {shift, "shift"}, {coef_xmu, "coef_xmu"},
                                {coef_c, "coef_c"}})
    check_channel_vector(input, t, name);
  auto grad_input = new_output_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_elementwise_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto mu = channel_params<acc_t>(mean, v.channels, 0);
    const auto sc = channel_params<acc_t>(scale, v.channels, 1);
    const auto sh = channel_params<acc_t>(shift, v.channels, 0);
    const auto kx = channel_params<acc_t>(coef_xmu, v.channels, 0);
    const auto kc = channel_params<acc_t>(coef_c, v.channels, 0);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    for_each_element(v, [&](int64_t c, int64_t i) {
      const acc_t xmu = static_cast<acc_t>(xp[i]) - mu[c];
      acc_t dz = static_cast<acc_t>(gp[i]);
      if (relu && !(xmu * sc[c] + sh[c] > 0)) dz = 0;
      dxp[i] = static_cast<scalar_t>(sc[c] * dz + xmu * kx[c] + kc[c]);
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_act_forward", &cpu::bn_act_forward_cpu);
  m.impl("bn_act_backward_reduce", &cpu::bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elementwise", &cpu::bn_act_backward_elementwise_cpu);
}

}  // namespace fusedres

// The C++ CPU kernels of normalize-activate and its backward, compiled twice: for the baseline
// x86-64 (bn_act_cpu.cpp) and with AVX2 (avx2.cpp), each in its own namespace
// FUSEDRES_CPU_ISA; bn_act_cpu.cpp picks one at run time. Include after every header these
// kernels use (all that a second TU compiles with another target must be defined here or be a
// template instantiated here).
#ifndef FUSEDRES_CPU_ISA
#error "define FUSEDRES_CPU_ISA (the namespace of this build of the kernels) before including this file"
#endif

namespace fusedres {
namespace cpu {
namespace FUSEDRES_CPU_ISA {


// Per-channel parameter vectors as acc_t, with the defaults of absent ones (mean 0, scale 1).
// Read in place when contiguous float32 / float64 (always, from fusedres's own callers): a
// conversion would be an ATen op, a launch of its own, per vector per call.
template <typename acc_t>
std::vector<acc_t> channel_params(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (!t.has_value()) return out;
  const at::Tensor& v = *t;
  if (v.is_contiguous() && v.scalar_type() == at::kFloat) {
    const float* p = v.const_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  } else if (v.is_contiguous() && v.scalar_type() == at::kDouble) {
    const double* p = v.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  } else {
    auto d = v.to(at::kDouble).contiguous();
    const double* p = d.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

// dz = grad * act'(u) (u recomputed from x; ReLU's mask from the output after a residual add) and its per-channel sums
// sum(dz), sum(dz * (x - mean)) over index range [i0, i1) of one channel c (NCHW) or of rows
// [i0, i1) of all C channels (channels_last, step C). Templated on the options so the inner loop
// has no branches and, with restrict pointers, vectorizes.
template <typename scalar_t, typename acc_t, int ACT, bool FROM_OUTPUT, bool WRITE>
struct DzSums {
  const scalar_t* __restrict__ g;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ out;
  scalar_t* __restrict__ dz_out;
  const acc_t* __restrict__ mu;
  const acc_t* __restrict__ sc;
  const acc_t* __restrict__ sh;
  acc_t alpha;

  inline void element(int64_t c, int64_t i, acc_t& s0, acc_t& s1) const {
    const acc_t xmu = static_cast<acc_t>(x[i]) - mu[c];
    acc_t dz = static_cast<acc_t>(g[i]);
    if constexpr (FROM_OUTPUT) {
      dz = static_cast<acc_t>(out[i]) > acc_t(0) ? dz : acc_t(0);
    } else {
      dz = activation_backward<ACT>(dz, xmu * sc[c] + sh[c], alpha);
    }
    if constexpr (WRITE) dz_out[i] = static_cast<scalar_t>(dz);
    s0 += dz;
    s1 += dz * xmu;
  }

  // rows [o0, o1) of a channels_last array: s0[c], s1[c] += over the rows. The members are read
  // into locals first: the stores into s0 / s1 could otherwise alias them (a reload per element,
  // and no vectorized loop: 5x the time of the NCHW loop with a ReLU mask, 25x with ReLU6's).
  // element()'s body is written out again here on purpose: sharing it through a function taking
  // s0[c] / s1[c] by reference lost the vectorization again (ReLU6: 0.7 -> 24 ms, measured).
  void rows(int64_t o0, int64_t o1, int64_t C, acc_t* __restrict__ s0, acc_t* __restrict__ s1) const {
    const scalar_t* __restrict__ gp = g;
    const scalar_t* __restrict__ xp = x;
    const scalar_t* __restrict__ op = out;
    scalar_t* __restrict__ dzp = dz_out;
    const acc_t* __restrict__ mup = mu;
    const acc_t* __restrict__ scp = sc;
    const acc_t* __restrict__ shp = sh;
    const acc_t a = alpha;
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t base = o * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = base + c;
        const acc_t xmu = static_cast<acc_t>(xp[i]) - mup[c];
        acc_t dz = static_cast<acc_t>(gp[i]);
        if constexpr (FROM_OUTPUT) {
          dz = static_cast<acc_t>(op[i]) > acc_t(0) ? dz : acc_t(0);
        } else {
          dz = activation_backward<ACT>(dz, xmu * scp[c] + shp[c], a);
        }
        if constexpr (WRITE) dzp[i] = static_cast<scalar_t>(dz);
        s0[c] += dz;
        s1[c] += dz * xmu;
      }
    }
  }
};

// Per-channel (sum dz, sum dz * xmu) as [2 * C] doubles. Sums run in acc_t over blocks of at most
// kBlock values per channel, each block's total added into double: float32 rounding stays within
// a block and the inner loops vectorize.
template <typename Sums>
std::vector<double> reduce_dz_per_channel(const ChannelView& v, const Sums& sums) {
  using acc_t = typename std::remove_reference<decltype(*sums.mu)>::type;
  using acc = typename std::remove_const<acc_t>::type;
  constexpr int64_t kBlock = 64;
  const int64_t C = v.channels;
  std::vector<double> totals(2 * C, 0.0);
  if (v.inner > 1) {  // NCHW: a task per channel, contiguous planes
    at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        double t0 = 0, t1 = 0;
        for (int64_t o = 0; o < v.outer; ++o) {
          const int64_t base = (o * C + c) * v.inner;
          for (int64_t k0 = 0; k0 < v.inner; k0 += kBlock) {
            // kLanes independent accumulators: a float reduction vectorizes only without reordering
            constexpr int64_t kLanes = 16;
            acc s0[kLanes] = {}, s1[kLanes] = {};
            const int64_t k1 = std::min(v.inner, k0 + kBlock);
            int64_t k = k0;
            for (; k + kLanes <= k1; k += kLanes)
              for (int64_t j = 0; j < kLanes; ++j) sums.element(c, base + k + j, s0[j], s1[j]);
            for (; k < k1; ++k) sums.element(c, base + k, s0[0], s1[0]);
            for (int64_t j = 0; j < kLanes; ++j) {
              t0 += s0[j];
              t1 += s1[j];
            }
          }
        }
        totals[c] = t0;
        totals[C + c] = t1;
      }
    });
    return totals;
  }
  // channels_last: a task per chunk of rows, [2][C] block sums over the contiguous channels
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(v.outer, at::get_num_threads() * 4));
  const int64_t rows_per_chunk = (v.outer + chunks - 1) / chunks;
  std::vector<double> partial(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t ch_begin, int64_t ch_end) {
    std::vector<acc> block(2 * C);
    for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
      double* part = partial.data() + ch * 2 * C;
      const int64_t o_end = std::min(v.outer, (ch + 1) * rows_per_chunk);
      for (int64_t o0 = ch * rows_per_chunk; o0 < o_end; o0 += kBlock) {
        std::fill(block.begin(), block.end(), acc(0));
        sums.rows(o0, std::min(o_end, o0 + kBlock), C, block.data(), block.data() + C);
        for (int64_t j = 0; j < 2 * C; ++j) part[j] += block[j];
      }
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t j = 0; j < 2 * C; ++j) totals[j] += partial[ch * 2 * C + j];
  return totals;
}

// SiLU and GELU take exp / erf per element. Compiled for the baseline x86-64 (SSE2, no FMA, no
// blend), this file's loops over them ran 15-40x slower than ATen's runtime-dispatched vectorized
// functions (SiLU's normalize pass over 2.4M float32 values: 18 ms, against 1.2 ms for the same
// loop built with AVX2 + FMA and 1.75 ms for at::silu on one thread). So on the CPU these three run
// as ATen's own functions around the plain passes: forward u = normalize(x), then act in place;
// backward du = act'(u) * grad from a recomputed u (transient), then the passes with no
// activation. The values are stock's (ATen computes the activation in both).
bool aten_activation(int64_t act) { return act == kActSilu || act == kActGelu || act == kActGeluTanh; }

bool is_reduced_float(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

void apply_aten_activation_(at::Tensor& u, int64_t act) {
  if (act == kActSilu) {
    at::silu_(u);
  } else {
    at::gelu_(u, act == kActGeluTanh ? "tanh" : "none");
  }
}

// act'(u) * grad written over u (an elementwise op may write its own input: one fresh
// activation-sized buffer per backward pass, not two; each costs its page faults, ~1 ms per 10 MB)
void aten_activation_backward_(at::Tensor& u, const at::Tensor& grad, int64_t act) {
  if (act == kActSilu) {
    at::silu_backward_out(u, grad, u);
  } else {
    at::gelu_backward_out(u, grad, u, act == kActGeluTanh ? "tanh" : "none");
  }
}

at::Tensor bn_act_forward_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& mean,
                              const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& residual, int64_t act, double alpha) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  if (mean) check_channel_vector(input, *mean, "mean");
  if (scale) check_channel_vector(input, *scale, "scale");
  check_channel_vector(input, shift, "shift");
  if (residual) check_same_layout(input, *residual, "residual");
  check_activation_code(act);
  if (aten_activation(act)) {
    if (is_reduced_float(input)) {  // u in float32, rounded once, as the kernels' own activations
      auto r = residual ? c10::optional<at::Tensor>(residual->to(at::kFloat)) : c10::nullopt;
      return bn_act_forward_cpu(input.to(at::kFloat), mean, scale, shift, r, act, alpha).to(input.scalar_type());
    }
    at::Tensor y = bn_act_forward_cpu(input, mean, scale, shift, residual, kActNone, 0.0);
    apply_aten_activation_(y, act);
    return y;
  }
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
    const acc_t a = static_cast<acc_t>(alpha);
    // templated on the activation and the residual: the inner loop has no branch of either
    auto run = [&](auto act_c, auto has_residual_c) {
      constexpr int ACT = decltype(act_c)::value;
      constexpr bool HAS_RESIDUAL = decltype(has_residual_c)::value;
      // captured by value: locals the stores into yp cannot alias
      for_each_element(v, [=](int64_t c, int64_t i) {
        acc_t z = (static_cast<acc_t>(xp[i]) - mup[c]) * scp[c] + shp[c];
        if constexpr (HAS_RESIDUAL) z += static_cast<acc_t>(rp[i]);
        yp[i] = static_cast<scalar_t>(activate<ACT>(z, a));
      });
    };
    dispatch_activation(act, [&](auto act_c) {
      rp ? run(act_c, std::true_type{}) : run(act_c, std::false_type{});
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, const c10::optional<at::Tensor>& output,
    int64_t act, double alpha, bool write_grad_z) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "fusedres: grad_output dtype ",
              grad_output.scalar_type(), " must match input dtype ", input.scalar_type());
  check_channel_vector(input, mean, "mean");
  check_channel_vector(input, scale, "scale");
  check_channel_vector(input, shift, "shift");
  if (output) {
    check_same_layout(input, *output, "output");
    TORCH_CHECK(act == kActRelu, "fusedres: output (the ReLU mask's source) is given only with act = ReLU (",
                kActRelu, "), got act ", act);
  }
  check_activation_code(act);
  if (aten_activation(act) && !output) {
    if (is_reduced_float(input)) {  // du and its sums from float32 u and grad (one rounding, of dz)
      auto r = bn_act_backward_reduce_cpu(grad_output.to(at::kFloat), input.to(at::kFloat), mean, scale, shift,
                                          c10::nullopt, act, alpha, write_grad_z);
      return {std::get<0>(r), std::get<1>(r),
              write_grad_z ? std::get<2>(r).to(input.scalar_type()) : at::empty({0}, grad_output.options())};
    }
    at::Tensor du = bn_act_forward_cpu(input, mean, scale, shift, c10::nullopt, kActNone, 0.0);
    aten_activation_backward_(du, grad_output, act);
    auto sums = bn_act_backward_reduce_cpu(du, input, mean, scale, shift, c10::nullopt, kActNone, 0.0, false);
    return {std::get<0>(sums), std::get<1>(sums), write_grad_z ? du : std::get<2>(sums)};
  }
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
    if (output) out_cast = output->scalar_type() == input.scalar_type() ? *output : output->to(input.scalar_type());
    const scalar_t* op = output ? out_cast.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dzp = write_grad_z ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    std::vector<double> sums;
    auto run = [&](auto act_c, auto from_output_c, auto write_c) {
      DzSums<scalar_t, acc_t, decltype(act_c)::value, decltype(from_output_c)::value, decltype(write_c)::value> d{
          gp, xp, op, dzp, mu.data(), sc.data(), sh.data(), static_cast<acc_t>(alpha)};
      sums = reduce_dz_per_channel(v, d);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (op) {
      dzp ? run(std::integral_constant<int, kActRelu>{}, T{}, T{})
          : run(std::integral_constant<int, kActRelu>{}, T{}, F{});
    } else {
      dispatch_activation(act, [&](auto act_c) { dzp ? run(act_c, F{}, T{}) : run(act_c, F{}, F{}); });
    }
    // written in a loop, not with copy_: an ATen op would be a launch of its own
    acc_t* s0 = sum_dz.mutable_data_ptr<acc_t>();
    acc_t* s1 = sum_dz_xmu.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < v.channels; ++c) {
      s0[c] = static_cast<acc_t>(sums[c]);
      s1[c] = static_cast<acc_t>(sums[v.channels + c]);
    }
  });
  return {sum_dz, sum_dz_xmu, grad_z};
}

at::Tensor bn_act_backward_elementwise_cpu(const at::Tensor& grad, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& coef_xmu,
                                           const at::Tensor& coef_c, int64_t act, double alpha) {
  check_float_input(input, "input");
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad, "grad");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "fusedres: grad dtype ", grad.scalar_type(),
              " must match input dtype ", input.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                {scale, "scale"}, {shift, "shift"}, {coef_xmu, "coef_xmu"},
                                {coef_c, "coef_c"}})
    check_channel_vector(input, t, name);
  check_activation_code(act);
  at::Tensor grad_input, du;
  if (aten_activation(act) && is_reduced_float(input)) {
    return bn_act_backward_elementwise_cpu(grad.to(at::kFloat), input.to(at::kFloat), mean, scale, shift, coef_xmu,
                                           coef_c, act, alpha).to(input.scalar_type());
  }
  if (aten_activation(act)) {  // (the input gradient written over du: one fresh buffer, as for the others)
    du = bn_act_forward_cpu(input, mean, scale, shift, c10::nullopt, kActNone, 0.0);
    aten_activation_backward_(du, grad, act);
    grad_input = du;
    act = kActNone;
  } else {
    grad_input = new_output_like(input);
  }
  const at::Tensor& grad_in = du.defined() ? du : grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_elementwise_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto mu = channel_params<acc_t>(mean, v.channels, 0);
    const auto sc = channel_params<acc_t>(scale, v.channels, 1);
    const auto sh = channel_params<acc_t>(shift, v.channels, 0);
    const auto kx = channel_params<acc_t>(coef_xmu, v.channels, 0);
    const auto kc = channel_params<acc_t>(coef_c, v.channels, 0);
    const scalar_t* gp = grad_in.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    const acc_t a = static_cast<acc_t>(alpha);
    dispatch_activation(act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
      const acc_t *mup = mu.data(), *scp = sc.data(), *shp = sh.data(), *kxp = kx.data(), *kcp = kc.data();
      for_each_element(v, [=](int64_t c, int64_t i) {  // by value: locals the stores cannot alias
        const acc_t xmu = static_cast<acc_t>(xp[i]) - mup[c];
        const acc_t dz = activation_backward<ACT>(static_cast<acc_t>(gp[i]), xmu * scp[c] + shp[c], a);
        dxp[i] = static_cast<scalar_t>(scp[c] * dz + xmu * kxp[c] + kcp[c]);
      });
    });
  });
  return grad_input;
}


}  // namespace FUSEDRES_CPU_ISA
}  // namespace cpu
}  // namespace fusedres

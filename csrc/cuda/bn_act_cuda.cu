// Normalize-activate y = act((x - mean) * scale + shift + residual) and its backward on CUDA.
// Forward: one elementwise pass. Backward: one reduction pass (which also writes the residual's
// gradient when asked) and one elementwise pass.
#include <ATen/Dispatch.h>

#include "../activation.h"
#include "cuda_utils.cuh"

namespace fusedres {
namespace cuda {
namespace {

// Pointers to per-channel float parameters; a null pointer means "absent" (mean 0, scale 1).
template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  __device__ __forceinline__ acc_t normalized(acc_t x, int64_t c) const {
    const acc_t xmu = mean ? x - mean[c] : x;
    return (scale ? xmu * scale[c] : xmu) + shift[c];
  }
};

template <typename scalar_t, typename acc_t, int VEC>
__global__ void bn_act_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                      scalar_t* __restrict__ y, ChannelParams<acc_t> p, int64_t numel,
                                      int64_t C, int64_t inner, int act, acc_t alpha) {
  using PackT = Pack<scalar_t, VEC>;
  const int64_t packs = numel / VEC;
  for (int64_t pk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = pk * VEC;
    const PackT xv = reinterpret_cast<const PackT*>(x)[pk];
    PackT rv;
    if (residual) rv = reinterpret_cast<const PackT*>(residual)[pk];
    PackT out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = ((i0 + j) / inner) % C;
      acc_t z = p.normalized(static_cast<acc_t>(xv.val[j]), c);
      if (residual) z += static_cast<acc_t>(rv.val[j]);
      out.val[j] = static_cast<scalar_t>(activate_code(act, z, alpha));
    }
    reinterpret_cast<PackT*>(y)[pk] = out;
  }
}

// part: [2, splits, C] partial sums of dz and dz * (x - mean).
template <typename scalar_t, typename acc_t>
__global__ void bn_act_backward_reduce_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_z,
                                              const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                              const acc_t* __restrict__ shift, int64_t C, int64_t inner, int64_t count,
                                              int64_t rows_per_split, int act, acc_t alpha,
                                              acc_t* __restrict__ part) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);  // [2][blockDim.y][blockDim.x]
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min(count, row_begin + rows_per_split);
  acc_t sum_dz = 0, sum_dz_xmu = 0;
  if (c < C) {
    const acc_t mu = mean[c], sc = scale[c], sf = shift[c];
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
      const int64_t i = storage_index(r, c, C, inner);
      const acc_t xmu = static_cast<acc_t>(x[i]) - mu;
      acc_t dz = static_cast<acc_t>(grad_out[i]);
      if (output) {  // ReLU after a residual add: its mask from the output
        if (!(static_cast<acc_t>(output[i]) > acc_t(0))) dz = 0;
      } else {
        dz = activation_backward_code(act, dz, xmu * sc + sf, alpha);
      }
      if (grad_z) grad_z[i] = static_cast<scalar_t>(dz);
      sum_dz += dz;
      sum_dz_xmu += dz * xmu;
    }
  }
  const int tile = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    sh[t] = sum_dz;
    sh[tile + t] = sum_dz_xmu;
    __syncthreads();
    if (threadIdx.y < stride) {
      const int o = t + stride * blockDim.x;
      sum_dz += sh[o];
      sum_dz_xmu += sh[tile + o];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    part[blockIdx.y * C + c] = sum_dz;
    part[(gridDim.y + blockIdx.y) * C + c] = sum_dz_xmu;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void bn_act_backward_elementwise_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                   scalar_t* __restrict__ grad_input, ChannelParams<acc_t> p,
                                                   const acc_t* __restrict__ coef_xmu, const acc_t* __restrict__ coef_c,
                                                   int64_t numel, int64_t C, int64_t inner, int act,
                                                   acc_t alpha) {
  using PackT = Pack<scalar_t, VEC>;
  const int64_t packs = numel / VEC;
  for (int64_t pk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = pk * VEC;
    const PackT gv = reinterpret_cast<const PackT*>(grad)[pk];
    const PackT xv = reinterpret_cast<const PackT*>(x)[pk];
    PackT out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = ((i0 + j) / inner) % C;
      const acc_t xmu = static_cast<acc_t>(xv.val[j]) - p.mean[c];
      const acc_t dz = activation_backward_code(act, static_cast<acc_t>(gv.val[j]), xmu * p.scale[c] + p.shift[c], alpha);
      out.val[j] = static_cast<scalar_t>(p.scale[c] * dz + xmu * coef_xmu[c] + coef_c[c]);
    }
    reinterpret_cast<PackT*>(grad_input)[pk] = out;
  }
}

template <typename acc_t>
const acc_t* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<acc_t>() : nullptr;
}

// Runs launch(std::integral_constant<int, VEC>) with the widest VEC the pointers allow.
template <typename Launch>
void with_vec(int vec, const Launch& launch) {
  switch (vec) {
    case 8: launch(std::integral_constant<int, 8>()); break;
    case 4: launch(std::integral_constant<int, 4>()); break;
    case 2: launch(std::integral_constant<int, 2>()); break;
    default: launch(std::integral_constant<int, 1>());
  }
}

constexpr int kElementwiseThreads = 256;

at::Tensor bn_act_forward_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& mean,
                               const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                               const c10::optional<at::Tensor>& residual, int64_t act, double alpha) {
  check_float_input(input, "input");
  check_activation_code(act);
  const ChannelView v = channel_view(input, "input");
  const auto acc = stats_dtype(input);
  auto as_acc = [&](const c10::optional<at::Tensor>& t, const char* name) -> c10::optional<at::Tensor> {
    if (!t) return c10::nullopt;
    check_channel_vector(input, *t, name);
    return t->to(acc);
  };
  const auto mean_a = as_acc(mean, "mean"), scale_a = as_acc(scale, "scale"), shift_a = as_acc(shift, "shift");
  c10::optional<at::Tensor> res;
  if (residual) {
    check_same_layout(input, *residual, "residual");
    res = residual->to(input.scalar_type());
  }
  c10::cuda::CUDAGuard guard(input.device());
  auto out = new_output_like(input);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const ChannelParams<acc_t> p{opt_ptr<acc_t>(mean_a), opt_ptr<acc_t>(scale_a), shift_a->const_data_ptr<acc_t>()};
    const scalar_t* rp = res ? res->const_data_ptr<scalar_t>() : nullptr;
    const int vec = elementwise_vec(v.numel(), sizeof(scalar_t), {input.const_data_ptr(), rp, out.const_data_ptr()});
    with_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      bn_act_forward_kernel<scalar_t, acc_t, VEC>
          <<<elementwise_grid(v.numel(), VEC, kElementwiseThreads, input.get_device()), kElementwiseThreads, 0,
             c10::cuda::getCurrentCUDAStream()>>>(input.const_data_ptr<scalar_t>(), rp,
                                                   out.mutable_data_ptr<scalar_t>(), p, v.numel(), v.channels,
                                                   v.inner, static_cast<int>(act), static_cast<acc_t>(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& output, int64_t act, double alpha, bool write_grad_z) {
  check_float_input(input, "input");
  check_activation_code(act);
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "fusedres: grad_output dtype ",
              grad_output.scalar_type(), " must match input dtype ", input.scalar_type());
  check_channel_vector(input, mean, "mean");
  check_channel_vector(input, scale, "scale");
  check_channel_vector(input, shift, "shift");
  c10::optional<at::Tensor> out_cast;
  if (output) {
    check_same_layout(input, *output, "output");
    TORCH_CHECK(act == kActRelu, "fusedres: output (the ReLU mask's source) is given only with act = ReLU (",
                kActRelu, "), got act ", act);
    out_cast = output->to(input.scalar_type());
  }
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc = stats_dtype(input);
  auto grad_z = write_grad_z ? new_output_like(grad_output) : at::empty({0}, grad_output.options());
  if (v.count() == 0) {
    auto zeros = at::zeros({v.channels}, input.options().dtype(acc));
    return {zeros, zeros.clone(), grad_z};
  }
  const ReduceShape shape = reduce_shape(v, input.get_device());
  auto part = new_scratch({2, static_cast<int64_t>(shape.grid.y), v.channels}, input.options().dtype(acc));
  const auto mean_a = mean.to(acc), scale_a = scale.to(acc), shift_a = shift.to(acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const size_t smem = 2 * shape.block.x * shape.block.y * sizeof(acc_t);
    bn_act_backward_reduce_kernel<scalar_t, acc_t><<<shape.grid, shape.block, smem, c10::cuda::getCurrentCUDAStream()>>>(
        grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        out_cast ? out_cast->const_data_ptr<scalar_t>() : nullptr,
        write_grad_z ? grad_z.mutable_data_ptr<scalar_t>() : nullptr, mean_a.const_data_ptr<acc_t>(),
        scale_a.const_data_ptr<acc_t>(), shift_a.const_data_ptr<acc_t>(), v.channels, v.inner, v.count(),
        shape.rows_per_split, static_cast<int>(act), static_cast<acc_t>(alpha), part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto sums = part.sum(1);  // [2, C]; a fixed-order reduction, so the result is deterministic
  return {sums[0], sums[1], grad_z};
}

at::Tensor bn_act_backward_elementwise_cuda(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& mean,
                                            const at::Tensor& scale, const at::Tensor& shift,
                                            const at::Tensor& coef_xmu, const at::Tensor& coef_c, int64_t act,
                                            double alpha) {
  check_float_input(input, "input");
  check_activation_code(act);
  const ChannelView v = channel_view(input, "input");
  check_same_layout(input, grad, "grad");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "fusedres: grad dtype ", grad.scalar_type(),
              " must match input dtype ", input.scalar_type());
  const auto acc = stats_dtype(input);
  auto as_acc = [&](const at::Tensor& t, const char* name) {
    check_channel_vector(input, t, name);
    return t.to(acc);
  };
  const auto mean_a = as_acc(mean, "mean"), scale_a = as_acc(scale, "scale"), shift_a = as_acc(shift, "shift");
  const auto kx = as_acc(coef_xmu, "coef_xmu"), kc = as_acc(coef_c, "coef_c");
  c10::cuda::CUDAGuard guard(input.device());
  auto grad_input = new_output_like(input);
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_elementwise_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const ChannelParams<acc_t> p{mean_a.const_data_ptr<acc_t>(), scale_a.const_data_ptr<acc_t>(),
                                 shift_a.const_data_ptr<acc_t>()};
    const int vec = elementwise_vec(v.numel(), sizeof(scalar_t),
                                    {grad.const_data_ptr(), input.const_data_ptr(), grad_input.const_data_ptr()});
    with_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      bn_act_backward_elementwise_kernel<scalar_t, acc_t, VEC>
          <<<elementwise_grid(v.numel(), VEC, kElementwiseThreads, input.get_device()), kElementwiseThreads, 0,
             c10::cuda::getCurrentCUDAStream()>>>(grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                                   grad_input.mutable_data_ptr<scalar_t>(), p,
                                                   kx.const_data_ptr<acc_t>(), kc.const_data_ptr<acc_t>(), v.numel(),
                                                   v.channels, v.inner, static_cast<int>(act),
                                                   static_cast<acc_t>(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fusedres_kernels, CUDA, m) {
  m.impl("bn_act_forward", &cuda::bn_act_forward_cuda);
  m.impl("bn_act_backward_reduce", &cuda::bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elementwise", &cuda::bn_act_backward_elementwise_cuda);
}

}  // namespace fusedres

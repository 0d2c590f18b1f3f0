// BatchNorm batch statistics on CUDA: a Welford partial reduction per (channel tile, row split)
// followed by a per-channel Chan merge of the splits with the bookkeeping. One read of the
// activation; also BatchNorm's backward bookkeeping (bn_backward_finalize).
#include <ATen/Dispatch.h>

#include "cuda_utils.cuh"

namespace fusedres {
namespace cuda {
namespace {

// part_mean / part_m2: [splits, C]. Split s covers rows [s * rows_per_split, ...) of the channel.
template <typename scalar_t, typename acc_t>
__global__ void bn_stats_partial_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t inner,
                                        int64_t count, int64_t rows_per_split, acc_t* __restrict__ part_mean,
                                        acc_t* __restrict__ part_m2) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);  // [3][blockDim.y][blockDim.x]
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min(count, row_begin + rows_per_split);
  acc_t n = 0, mean = 0, m2 = 0;
  if (c < C) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += blockDim.y) {
      const acc_t v = static_cast<acc_t>(x[storage_index(r, c, C, inner)]);
      n += acc_t(1);
      const acc_t delta = v - mean;
      mean += delta / n;
      m2 += delta * (v - mean);
    }
  }
  const int tile = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    sh[t] = n;
    sh[tile + t] = mean;
    sh[2 * tile + t] = m2;
    __syncthreads();
    if (threadIdx.y < stride) {
      const int o = t + stride * blockDim.x;
      welford_merge(n, mean, m2, sh[o], sh[tile + o], sh[2 * tile + o]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    part_mean[blockIdx.y * C + c] = mean;
    part_m2[blockIdx.y * C + c] = m2;
  }
}

// Merges the splits, then the per-channel bookkeeping in the same kernel: invstd = 1/sqrt(var +
// eps) and nn.BatchNorm2d's running update (running_t: the running statistics' dtype), so a
// BatchNorm's statistics are two launches and no ATen op.
template <typename acc_t, typename running_t>
__global__ void bn_stats_merge_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                                      int64_t C, int64_t splits, int64_t count, int64_t rows_per_split, acc_t eps,
                                      acc_t keep, acc_t f, acc_t f_unbiased, running_t* __restrict__ running_mean,
                                      running_t* __restrict__ running_var, acc_t* __restrict__ mean_out,
                                      acc_t* __restrict__ invstd_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const acc_t n_s = static_cast<acc_t>(min(rows_per_split, count - s * rows_per_split));
    welford_merge(n, mean, m2, n_s, part_mean[s * C + c], part_m2[s * C + c]);
  }
  const acc_t var = m2 / n;
  mean_out[c] = mean;
  invstd_out[c] = acc_t(1) / sqrt(var + eps);
  if (running_mean != nullptr) {
    running_mean[c] = static_cast<running_t>(static_cast<acc_t>(running_mean[c]) * keep + mean * f);
    running_var[c] = static_cast<running_t>(static_cast<acc_t>(running_var[c]) * keep + var * f_unbiased);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input, double eps,
                                                 const c10::optional<at::Tensor>& running_mean,
                                                 const c10::optional<at::Tensor>& running_var,
                                                 double momentum) {
  check_float_input(input, "input");
  check_running(input, running_mean, running_var);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "fusedres: running_mean and running_var must be given together");
  const bool update = running_mean.has_value();
  if (update) {
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous() &&
                    running_mean->scalar_type() == running_var->scalar_type(),
                "fusedres: running statistics must be contiguous and of one dtype");
  }
  const ChannelView v = channel_view(input, "input");
  TORCH_CHECK(v.count() > 0, "fusedres: bn_stats needs at least one value per channel, got input of shape ",
              input.sizes());
  TORCH_CHECK(!update || v.count() > 1, "fusedres: the running variance needs more than 1 value per channel");
  c10::cuda::CUDAGuard guard(input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ReduceShape shape = reduce_shape(v, input.get_device());
  auto opts = input.options().dtype(stats_dtype(input));
  auto part = new_scratch({2, static_cast<int64_t>(shape.grid.y), v.channels}, opts);
  auto mean = new_channel_output(input, stats_dtype(input));
  auto invstd = new_channel_output(input, stats_dtype(input));
  const double unbias = static_cast<double>(v.count()) / static_cast<double>(std::max<int64_t>(v.count() - 1, 1));
  const at::ScalarType running_type = update ? running_mean->scalar_type() : stats_dtype(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const size_t smem = 3 * shape.block.x * shape.block.y * sizeof(acc_t);
    bn_stats_partial_kernel<scalar_t, acc_t><<<shape.grid, shape.block, smem, stream>>>(
        input.const_data_ptr<scalar_t>(), v.channels, v.inner, v.count(), shape.rows_per_split,
        part[0].mutable_data_ptr<acc_t>(), part[1].mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((v.channels + threads - 1) / threads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type, "bn_stats_merge", [&] {
      bn_stats_merge_kernel<acc_t, scalar_t><<<blocks, threads, 0, stream>>>(
          part[0].const_data_ptr<acc_t>(), part[1].const_data_ptr<acc_t>(), v.channels, shape.grid.y, v.count(),
          shape.rows_per_split, static_cast<acc_t>(eps), static_cast<acc_t>(1.0 - momentum),
          static_cast<acc_t>(momentum), static_cast<acc_t>(momentum * unbias),
          update ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
          update ? running_var->mutable_data_ptr<scalar_t>() : nullptr, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd};
}

// BatchNorm's per-channel backward bookkeeping, one thread per channel (see csrc/fusedres.cpp).
template <typename acc_t>
__global__ void bn_backward_finalize_kernel(const acc_t* __restrict__ s1, const acc_t* __restrict__ s2,
                                            const acc_t* __restrict__ invstd, const acc_t* __restrict__ scale,
                                            int64_t rows, int64_t C, acc_t n, bool batch_stats,
                                            acc_t* __restrict__ grad_gamma, acc_t* __restrict__ grad_beta,
                                            acc_t* __restrict__ coef_xmu, acc_t* __restrict__ coef_c) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t a = 0, b = 0;
  for (int64_t t = 0; t < rows; ++t) {
    a += s1[t * C + c];
    b += s2[t * C + c];
  }
  const acc_t is = invstd[c], sc = scale[c];
  grad_gamma[c] = b * is;
  grad_beta[c] = a;
  coef_xmu[c] = batch_stats ? -sc * is * is * b / n : acc_t(0);
  coef_c[c] = batch_stats ? -sc * a / n : acc_t(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finalize_cuda(
    const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, const at::Tensor& invstd, const at::Tensor& scale,
    double count, bool batch_stats) {
  const BackwardSums s = check_backward_sums(sum_dz, sum_dz_xmu, invstd, scale);
  c10::cuda::CUDAGuard guard(invstd.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = invstd.options();
  auto grad_gamma = new_scratch({s.channels}, opts), grad_beta = new_scratch({s.channels}, opts);
  auto coef_xmu = new_scratch({s.channels}, opts), coef_c = new_scratch({s.channels}, opts);
  if (s.channels == 0) return {grad_gamma, grad_beta, coef_xmu, coef_c};
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((s.channels + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "bn_backward_finalize_cuda", [&] {
    bn_backward_finalize_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        sum_dz.const_data_ptr<scalar_t>(), sum_dz_xmu.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), s.rows, s.channels, static_cast<scalar_t>(count), batch_stats,
        grad_gamma.mutable_data_ptr<scalar_t>(), grad_beta.mutable_data_ptr<scalar_t>(),
        coef_xmu.mutable_data_ptr<scalar_t>(), coef_c.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_gamma, grad_beta, coef_xmu, coef_c};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fusedres_kernels, CUDA, m) {
  m.impl("bn_stats", &cuda::bn_stats_cuda);
  m.impl("bn_backward_finalize", &cuda::bn_backward_finalize_cuda);
}

}  // namespace fusedres

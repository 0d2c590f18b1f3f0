// BatchNorm batch statistics on CUDA: a Welford partial reduction per (channel tile, row split)
// followed by a per-channel Chan merge of the splits. One read of the activation.
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

template <typename acc_t>
__global__ void bn_stats_merge_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                                      int64_t C, int64_t splits, int64_t count, int64_t rows_per_split,
                                      acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const acc_t n_s = static_cast<acc_t>(min(rows_per_split, count - s * rows_per_split));
    welford_merge(n, mean, m2, n_s, part_mean[s * C + c], part_m2[s * C + c]);
  }
  mean_out[c] = mean;
  var_out[c] = m2 / n;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input, double eps,
                                                 const c10::optional<at::Tensor>& running_mean,
                                                 const c10::optional<at::Tensor>& running_var,
                                                 double momentum) {
  check_float_input(input, "input");
  check_running(input, running_mean, running_var);
  const ChannelView v = channel_view(input, "input");
  TORCH_CHECK(v.count() > 0, "fusedres: bn_stats needs at least one value per channel, got input of shape ",
              input.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ReduceShape shape = reduce_shape(v, input.get_device());
  auto opts = input.options().dtype(stats_dtype(input));
  auto part = new_scratch({2, static_cast<int64_t>(shape.grid.y), v.channels}, opts);
  auto mean = new_channel_output(input, stats_dtype(input));
  auto var = new_channel_output(input, stats_dtype(input));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const size_t smem = 3 * shape.block.x * shape.block.y * sizeof(acc_t);
    bn_stats_partial_kernel<scalar_t, acc_t><<<shape.grid, shape.block, smem, stream>>>(
        input.const_data_ptr<scalar_t>(), v.channels, v.inner, v.count(), shape.rows_per_split,
        part[0].mutable_data_ptr<acc_t>(), part[1].mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 128;
    bn_stats_merge_kernel<acc_t><<<static_cast<unsigned>((v.channels + threads - 1) / threads), threads, 0, stream>>>(
        part[0].const_data_ptr<acc_t>(), part[1].const_data_ptr<acc_t>(), v.channels, shape.grid.y, v.count(),
        shape.rows_per_split, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  update_running_stats(running_mean, running_var, mean, var, v.count(), momentum);
  auto invstd = (var + eps).rsqrt_();
  return {mean, invstd};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fusedres_kernels, CUDA, m) { m.impl("bn_stats", &cuda::bn_stats_cuda); }

}  // namespace fusedres

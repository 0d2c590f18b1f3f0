// Normalize-activate y = act((x - mean) * scale + shift + residual) and its backward, on the CPU:
// the kernels (bn_act_cpu_kernels.h) built for the baseline x86-64 here and with AVX2 in
// avx2.cpp, the latter run where the CPU has both. Measured, 2 threads, float32
// channels_last: the AVX2 build's passes take 0.5-0.7x the baseline's (e.g. [8, 512, 14, 14]:
// normalize 0.165 -> 0.078 ms, reduction 0.24 -> 0.14, elementwise 0.23 -> 0.15), below aten's
// BatchNorm (runtime-dispatched AVX2 itself) where the baseline build was ~2x above it.
#include <type_traits>

#include "../activation.h"
#include "channel_reduce_cpu.h"
#include "isa.h"

#define FUSEDRES_CPU_ISA baseline
#include "bn_act_cpu_kernels.h"
#undef FUSEDRES_CPU_ISA

namespace fusedres {
namespace cpu {
namespace avx2 {  // avx2.cpp
at::Tensor bn_act_forward_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& mean,
                              const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& residual, int64_t act, double alpha);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, const c10::optional<at::Tensor>& output,
    int64_t act, double alpha, bool write_grad_z);
at::Tensor bn_act_backward_elementwise_cpu(const at::Tensor& grad, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& coef_xmu,
                                           const at::Tensor& coef_c, int64_t act, double alpha);
}  // namespace avx2

namespace {

at::Tensor forward(const at::Tensor& input, const c10::optional<at::Tensor>& mean,
                   const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                   const c10::optional<at::Tensor>& residual, int64_t act, double alpha) {
  return use_avx2() ? avx2::bn_act_forward_cpu(input, mean, scale, shift, residual, act, alpha)
                    : baseline::bn_act_forward_cpu(input, mean, scale, shift, residual, act, alpha);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& output, int64_t act, double alpha, bool write_grad_z) {
  return use_avx2() ? avx2::bn_act_backward_reduce_cpu(grad_output, input, mean, scale, shift, output, act, alpha,
                                                       write_grad_z)
                    : baseline::bn_act_backward_reduce_cpu(grad_output, input, mean, scale, shift, output, act,
                                                           alpha, write_grad_z);
}

at::Tensor backward_elementwise(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& coef_xmu,
                                const at::Tensor& coef_c, int64_t act, double alpha) {
  return use_avx2() ? avx2::bn_act_backward_elementwise_cpu(grad, input, mean, scale, shift, coef_xmu, coef_c, act,
                                                            alpha)
                    : baseline::bn_act_backward_elementwise_cpu(grad, input, mean, scale, shift, coef_xmu, coef_c,
                                                                act, alpha);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres_kernels, CPU, m) {
  m.impl("bn_act_forward", &cpu::forward);
  m.impl("bn_act_backward_reduce", &cpu::backward_reduce);
  m.impl("bn_act_backward_elementwise", &cpu::backward_elementwise);
}

}  // namespace fusedres

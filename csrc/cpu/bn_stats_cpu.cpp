// BatchNorm batch statistics and the per-channel backward bookkeeping on the CPU: the kernels
// (bn_stats_cpu_kernels.h) built for the baseline x86-64 here and with AVX2 in avx2.cpp,
// picked per call as bn_act_cpu.cpp picks (isa.h).
#include <cmath>

#include "channel_reduce_cpu.h"
#include "isa.h"

#define FUSEDRES_CPU_ISA baseline
#include "bn_stats_cpu_kernels.h"
#undef FUSEDRES_CPU_ISA

namespace fusedres {
namespace cpu {
namespace avx2 {  // avx2.cpp
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input, double eps,
                                                const c10::optional<at::Tensor>& running_mean,
                                                const c10::optional<at::Tensor>& running_var, double momentum);
}  // namespace avx2

namespace {

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input, double eps,
                                         const c10::optional<at::Tensor>& running_mean,
                                         const c10::optional<at::Tensor>& running_var, double momentum) {
  return use_avx2() ? avx2::bn_stats_cpu(input, eps, running_mean, running_var, momentum)
                    : baseline::bn_stats_cpu(input, eps, running_mean, running_var, momentum);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres_kernels, CPU, m) {
  m.impl("bn_stats", &cpu::stats);
  // (C values: no loop worth a second build)
  m.impl("bn_backward_finalize", &cpu::baseline::bn_backward_finalize_cpu);
}

}  // namespace fusedres

// The kernels of bn_act_cpu_kernels.h and bn_stats_cpu_kernels.h built with AVX2 (namespace
// fusedres::cpu::avx2), run where the CPU has both (isa.h decides). Every header is included BEFORE the target
// pragma, so the inline functions they define are compiled for the baseline here as everywhere
// else (the linker keeps one copy of each: it must run on any x86-64); only this file's own
// functions and the templates instantiated for them (channel_reduce_cpu.h's loops over this file's
// lambdas, included after it) take AVX2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../bn_common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSEDRES_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// no a * b + c contracted into one FMA: the baseline build's rounding, element for element (with
// contraction the real-model tests' GoogLeNet BatchNorm bias gradient went from 2.4x to 3.2x
// stock float32's error against float64)
#pragma GCC optimize("fp-contract=off")
#endif

#include "channel_reduce_cpu.h"

#define FUSEDRES_CPU_ISA avx2
#include "bn_act_cpu_kernels.h"
#include "bn_stats_cpu_kernels.h"
#undef FUSEDRES_CPU_ISA

#ifdef FUSEDRES_AVX2_BUILD
#pragma GCC pop_options
#endif

namespace fusedres {
namespace cpu {
namespace avx2 {

bool compiled() {
#ifdef FUSEDRES_AVX2_BUILD
  return true;
#else
  return false;  // (another compiler or CPU: the same code for the baseline, never chosen)
#endif
}

}  // namespace avx2
}  // namespace cpu
}  // namespace fusedres

// Which build of the C++ CPU kernels a call runs: the AVX2 one (avx2.cpp, no FMA contraction) where it was
// compiled and the CPU has both (found once), unless FUSEDRES_CPU_ISA=baseline (read per call,
// ~0.1 us: the tests run both builds against float64).
#pragma once

#include <cstdlib>
#include <string>

namespace fusedres {
namespace cpu {
namespace avx2 {
bool compiled();  // avx2.cpp
}  // namespace avx2

inline bool use_avx2() {
  static const bool available = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  if (!available) return false;
  const char* forced = std::getenv("FUSEDRES_CPU_ISA");
  return forced == nullptr || std::string(forced) != "baseline";
}

}  // namespace cpu
}  // namespace fusedres

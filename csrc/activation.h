// The activations inside the CPU and CUDA BatchNorm kernels: act(u) and grad * act'(u).
//
// Codes are those of fusedres/common.py ACTIVATIONS (and kernels/activation_triton.py). Each is a
// template argument, so an inner loop holds only its own activation's arithmetic (the none / ReLU
// loops stay branch-free and vectorize). The formulas are torch's own, forward and backward, so a
// fused unit's values and gradients are stock's; alpha is LeakyReLU's negative slope.
#pragma once

#include <math.h>

#include <cstdint>
#include <type_traits>

#include <c10/util/Exception.h>

#ifdef __CUDACC__
#define FUSEDRES_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDRES_HOST_DEVICE inline __attribute__((always_inline))  // (a call in a loop stops its vectorization)
#endif

namespace fusedres {

enum ActivationCode : int {
  kActNone = 0,
  kActRelu = 1,
  kActRelu6 = 2,
  kActSilu = 3,
  kActHardswish = 4,
  kActLeakyRelu = 5,
  kActGelu = 6,
  kActGeluTanh = 7,
};
constexpr int kActivationCount = 8;

#ifndef __CUDA_ARCH__
// exp for float on the CPU, written so that a loop over it vectorizes (libm's expf is a call per
// element: SiLU's normalize pass over 2.4M values took 5.7 ms against 0.36 with no activation).
// Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial (truncation
// 5e-9 relative, below float's 6e-8 ulp), 2^k built in the exponent bits. Inputs clamped to
// [-87, 88] (2^k stays a normal float); NaN stays NaN (the comparisons are false for it).
inline __attribute__((always_inline)) float cpu_expf(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const int k = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));  // round half away: a truncating convert
  const float kf = static_cast<float>(k);
  const float r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;  // ln2 split so kf * hi is exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // __builtin_bit_cast (GCC >= 11, Clang): std::bit_cast needs C++20, and torch 2.11 builds these
  // files as C++17; a memcpy here did not vectorize
  return p * __builtin_bit_cast(float, static_cast<int32_t>((k + 127) << 23));
}
#endif

// expf / exp and the rest by the accumulation type (float for float, half and bfloat16 inputs)
#ifdef __CUDA_ARCH__
FUSEDRES_HOST_DEVICE float act_exp(float v) { return expf(v); }
FUSEDRES_HOST_DEVICE float act_tanh(float v) { return tanhf(v); }
#else
FUSEDRES_HOST_DEVICE float act_exp(float v) { return cpu_expf(v); }
// tanh(v) = 2 / (1 + e^(-2v)) - 1 on cpu_expf, vectorizable (within ~1e-7 of tanhf near 0, where
// GELU multiplies it by 0.5 v: relative to its output)
inline __attribute__((always_inline)) float act_tanh(float v) { return 2.0f / (1.0f + cpu_expf(-2.0f * v)) - 1.0f; }
#endif
FUSEDRES_HOST_DEVICE double act_exp(double v) { return exp(v); }
FUSEDRES_HOST_DEVICE float act_erf(float v) { return erff(v); }
FUSEDRES_HOST_DEVICE double act_erf(double v) { return erf(v); }
FUSEDRES_HOST_DEVICE double act_tanh(double v) { return tanh(v); }

template <typename T>
FUSEDRES_HOST_DEVICE T act_sigmoid(T u) {
  return T(1) / (T(1) + act_exp(-u));
}

template <int ACT, typename T>
FUSEDRES_HOST_DEVICE T activate(T u, T alpha) {
  if constexpr (ACT == kActRelu) {
    return u < T(0) ? T(0) : u;  // u < 0, not !(u > 0): NaN passes, as in torch.relu
  } else if constexpr (ACT == kActRelu6) {
    return u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
  } else if constexpr (ACT == kActSilu) {
    return u * act_sigmoid(u);
  } else if constexpr (ACT == kActHardswish) {
    const T r = u + T(3);
    return u * (r < T(0) ? T(0) : (r > T(6) ? T(6) : r)) / T(6);
  } else if constexpr (ACT == kActLeakyRelu) {
    return u * (u > T(0) ? T(1) : alpha);  // (u * 1 is u: a select of the factor, then one multiply)
  } else if constexpr (ACT == kActGelu) {
    return T(0.5) * u * (T(1) + act_erf(u * T(0.7071067811865476)));
  } else if constexpr (ACT == kActGeluTanh) {
    return T(0.5) * u * (T(1) + act_tanh(T(0.7978845608028654) * (u + T(0.044715) * u * u * u)));
  } else {
    return u;
  }
}

// grad * act'(u), torch's backward formulas (ReLU: u > 0; ReLU6: hardtanh's 0 < u < 6; Hardswish:
// 0 up to -3, u / 3 + 1/2 below 3, 1 from 3; GELU as gelu_backward).
template <int ACT, typename T>
FUSEDRES_HOST_DEVICE T activation_backward(T g, T u, T alpha) {
  if constexpr (ACT == kActRelu) {
    return u > T(0) ? g : T(0);
  } else if constexpr (ACT == kActRelu6) {
    const bool pass = (u > T(0)) & (u < T(6));  // & not ||: a select, no branch per element
    return pass ? g : T(0);
  } else if constexpr (ACT == kActSilu) {
    const T s = act_sigmoid(u);
    return g * s * (T(1) + u * (T(1) - s));
  } else if constexpr (ACT == kActHardswish) {
    const T slope = u < T(3) ? u / T(3) + T(0.5) : T(1);
    return u <= T(-3) ? T(0) : g * slope;
  } else if constexpr (ACT == kActLeakyRelu) {
    return g * (u > T(0) ? T(1) : alpha);
  } else if constexpr (ACT == kActGelu) {
    const T cdf = T(0.5) * (T(1) + act_erf(u * T(0.7071067811865476)));
    const T pdf = act_exp(T(-0.5) * u * u) * T(0.3989422804014327);
    return g * (cdf + u * pdf);
  } else if constexpr (ACT == kActGeluTanh) {
    const T beta = T(0.7978845608028654), kappa = T(0.044715);
    const T t = act_tanh(beta * (u + kappa * u * u * u));
    const T right = T(0.5) * u * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * u * u);
    return g * (T(0.5) * (T(1) + t) + right);
  } else {
    return g;
  }
}

// The same with the code known only at run time (the CUDA kernels: one instantiation per kernel
// rather than eight; the switch is uniform across a launch, so no warp diverges on it).
template <typename T>
FUSEDRES_HOST_DEVICE T activate_code(int act, T u, T alpha) {
  switch (act) {
    case kActRelu: return activate<kActRelu>(u, alpha);
    case kActRelu6: return activate<kActRelu6>(u, alpha);
    case kActSilu: return activate<kActSilu>(u, alpha);
    case kActHardswish: return activate<kActHardswish>(u, alpha);
    case kActLeakyRelu: return activate<kActLeakyRelu>(u, alpha);
    case kActGelu: return activate<kActGelu>(u, alpha);
    case kActGeluTanh: return activate<kActGeluTanh>(u, alpha);
    default: return u;
  }
}

template <typename T>
FUSEDRES_HOST_DEVICE T activation_backward_code(int act, T g, T u, T alpha) {
  switch (act) {
    case kActRelu: return activation_backward<kActRelu>(g, u, alpha);
    case kActRelu6: return activation_backward<kActRelu6>(g, u, alpha);
    case kActSilu: return activation_backward<kActSilu>(g, u, alpha);
    case kActHardswish: return activation_backward<kActHardswish>(g, u, alpha);
    case kActLeakyRelu: return activation_backward<kActLeakyRelu>(g, u, alpha);
    case kActGelu: return activation_backward<kActGelu>(g, u, alpha);
    case kActGeluTanh: return activation_backward<kActGeluTanh>(g, u, alpha);
    default: return g;
  }
}

inline void check_activation_code(int64_t act) {
  TORCH_CHECK(act >= 0 && act < kActivationCount, "fusedres: act must be an activation code in [0, ",
              kActivationCount, ") (fusedres.common.ACTIVATIONS), got ", act);
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime code `act`.
template <typename F>
void dispatch_activation(int64_t act, const F& f) {
  switch (act) {
    case kActNone: f(std::integral_constant<int, kActNone>{}); break;
    case kActRelu: f(std::integral_constant<int, kActRelu>{}); break;
    case kActRelu6: f(std::integral_constant<int, kActRelu6>{}); break;
    case kActSilu: f(std::integral_constant<int, kActSilu>{}); break;
    case kActHardswish: f(std::integral_constant<int, kActHardswish>{}); break;
    case kActLeakyRelu: f(std::integral_constant<int, kActLeakyRelu>{}); break;
    case kActGelu: f(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: f(std::integral_constant<int, kActGeluTanh>{}); break;
    default: check_activation_code(act);
  }
}

}  // namespace fusedres

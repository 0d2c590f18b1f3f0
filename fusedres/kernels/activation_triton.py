"""The activations inside the Triton kernels: act(u) and grad * act'(u), ACT = the code of
fusedres.common.ACTIVATIONS (a constexpr: each kernel compiles only the branch it uses), ALPHA =
LeakyReLU's negative slope. The formulas are torch's own, forward and backward (see
common.Activation), so a fused unit's values and gradients are stock's; tanh is written with the
sigmoid (core Triton has no tanh): 2 * sigmoid(2a) - 1, within an ulp of 1 of tanh near 0, which
GELU's 0.5 * u * (1 + tanh) makes relative to its output.
"""
import triton
import triton.language as tl

ACT_NONE, ACT_RELU, ACT_RELU6, ACT_SILU, ACT_HARDSWISH, ACT_LEAKY_RELU, ACT_GELU, ACT_GELU_TANH = range(8)


@triton.jit
def _tanh(a):
    return 2.0 * tl.sigmoid(2.0 * a) - 1.0


@triton.jit
def activate(u, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """act(u); comparisons written so NaN passes, as in torch (u < 0, not a max)."""
    if ACT == 1:  # ReLU
        u = tl.where(u < 0.0, 0.0, u)
    elif ACT == 2:  # ReLU6 = hardtanh(u, 0, 6)
        u = tl.where(u < 0.0, 0.0, tl.where(u > 6.0, 6.0, u))
    elif ACT == 3:  # SiLU
        u = u * tl.sigmoid(u)
    elif ACT == 4:  # Hardswish: u * relu6(u + 3) / 6
        r = u + 3.0
        u = u * tl.where(r < 0.0, 0.0, tl.where(r > 6.0, 6.0, r)) / 6.0
    elif ACT == 5:  # LeakyReLU
        u = tl.where(u > 0.0, u, u * ALPHA)
    elif ACT == 6:  # GELU (erf)
        u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    elif ACT == 7:  # GELU (tanh)
        u = 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
    return u


@triton.jit
def activation_backward(g, u, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """g * act'(u), torch's backward formula of each activation (ReLU: u > 0; ReLU6: hardtanh's
    0 < u < 6; Hardswish: 0 up to -3, u / 3 + 1/2 below 3, 1 from 3)."""
    if ACT == 1:
        g = tl.where(u > 0.0, g, 0.0)
    elif ACT == 2:
        g = tl.where((u <= 0.0) | (u >= 6.0), 0.0, g)
    elif ACT == 3:
        s = tl.sigmoid(u)
        g = g * s * (1.0 + u * (1.0 - s))
    elif ACT == 4:
        g = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, g * (u / 3.0 + 0.5), g))
    elif ACT == 5:
        g = tl.where(u > 0.0, g, g * ALPHA)
    elif ACT == 6:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        g = g * (cdf + u * pdf)
    elif ACT == 7:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        right = 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
        g = g * (0.5 * (1.0 + t) + right)
    return g

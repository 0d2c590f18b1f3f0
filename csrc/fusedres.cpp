// Op schemas of the fusedres extension. The CPU and CUDA implementations register themselves
// with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; Python calls them as torch.ops.fusedres_kernels.<op>
// (fusedres/ops registers the dispatching ops torch.ops.fusedres.<op>, which choose among backends).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedres_kernels, m) {
  // Per-channel batch mean and inverse standard deviation 1/sqrt(var + eps) (biased variance) of
  // an [N, C, ...] activation, accumulated in float32 (float64 for float64 input). When running
  // statistics are given they are updated in place as nn.BatchNorm2d does, with `momentum` the
  // exponential-average factor.
  m.def(
      "bn_stats(Tensor input, float eps, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum) -> (Tensor mean, Tensor invstd)");
  // y = act((input - mean[c]) * scale[c] + shift[c] + residual); act is an activation code of
  // csrc/activation.h (fusedres.common.ACTIVATIONS: 0 none, 1 ReLU, 2 ReLU6, 3 SiLU, 4 Hardswish,
  // 5 LeakyReLU with negative slope alpha, 6 GELU, 7 GELU tanh).
  // mean and scale are optional (absent: 0 and 1), which makes this also the epilogue of a
  // BN-folded conv: y = act(conv + bias[c] + residual).
  m.def(
      "bn_act_forward(Tensor input, Tensor? mean, Tensor? scale, Tensor shift, Tensor? residual, "
      "int act, float alpha) -> Tensor");
  // Backward reduction: with dz = grad_output * act'(u), u = (x - mean) * scale + shift, returns
  // sum(dz) and sum(dz * (x - mean)) per channel, and dz itself when write_grad_z (the residual's
  // gradient). With output given (act must be ReLU: a residual was added before it), the mask is
  // output > 0.
  m.def(
      "bn_act_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor scale, "
      "Tensor shift, Tensor? output, int act, float alpha, bool write_grad_z) -> "
      "(Tensor sum_dz, Tensor sum_dz_xmu, Tensor grad_z)");
  // Backward elementwise: dz = grad * act'((x - mean) * scale + shift);
  // grad_input = scale * dz + (x - mean) * coef_xmu + coef_c.
  m.def(
      "bn_act_backward_elementwise(Tensor grad, Tensor input, Tensor mean, Tensor scale, "
      "Tensor shift, Tensor coef_xmu, Tensor coef_c, int act, float alpha) -> Tensor");
  // A BatchNorm backward's per-channel bookkeeping, one small kernel: from the reduction's sums
  // ([C], or [T, C] partial rows added up here), grad_gamma = sum_dz_xmu * invstd,
  // grad_beta = sum_dz, and the input gradient's coefficients coef_xmu = -scale * invstd^2 *
  // sum_dz_xmu / count, coef_c = -scale * sum_dz / count (0 without batch statistics).
  m.def(
      "bn_backward_finalize(Tensor sum_dz, Tensor sum_dz_xmu, Tensor invstd, Tensor scale, float count, "
      "bool batch_stats) -> (Tensor grad_gamma, Tensor grad_beta, Tensor coef_xmu, Tensor coef_c)");
}

// `import fusedres._C` loads this library, which runs the registrations above.
static struct PyModuleDef fusedres_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusedres_module); }

// Whether this build contains the CUDA kernels, for fusedres.backends().
namespace fusedres {
bool built_with_cuda();
}
TORCH_LIBRARY_FRAGMENT(fusedres_kernels, m) {
  m.def("built_with_cuda() -> bool", [] { return fusedres::built_with_cuda(); });
}

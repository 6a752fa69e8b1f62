// The dinv operator library: schemas declared once here; each device's kernels register their
// implementations next to the kernels (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA).
// Autograd and fake (meta) kernels are registered from Python (dinv/ops/_native.py).
// The math of every op is in docs/kernels.md.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

extern "C" {
// `import dinv._C` loads this shared object, which runs the TORCH_LIBRARY static initializers.
// No Python functions are exported: everything is reached through torch.ops.dinv.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Every kernel reads its inputs through their strides (docs/kernels.md), so Inductor may pass
// whatever layout it chose (e.g. channels_last convolution outputs) instead of copying to the
// eager strides first.
static const std::vector<at::Tag> kFlexibleLayout = {at::Tag::flexible_layout};

TORCH_LIBRARY(dinv, m) {
  m.def(
      "channel_stats(Tensor x) -> (Tensor, Tensor)",
      kFlexibleLayout);
  m.def(
      "channel_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor",
      kFlexibleLayout);
  m.def(
      "bn_stats_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)",
      kFlexibleLayout);
  m.def(
      "bn_stats_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var, "
      "Tensor? weight, Tensor running_var, float eps) -> Tensor",
      kFlexibleLayout);
  m.def("image_prior_sums(Tensor x) -> (Tensor, Tensor)", kFlexibleLayout);
  m.def("image_prior_backward(Tensor x, Tensor tv_coef, Tensor sq_coef) -> Tensor",
        kFlexibleLayout);
  // The row ops of docs/kernels.md sections 4 and 5 share their schemas. A backward computes only
  // the gradients asked for (student_grad, teacher_grad); the other is an empty tensor.
  for (const char* name : {"js_rows", "jsd_rows", "kd_rows"}) {
    const std::string op(name);
    m.def((op + "(Tensor student_logits, Tensor teacher_logits, float T) -> Tensor").c_str(),
          kFlexibleLayout);
    m.def((op + "_backward(Tensor grad_rows, Tensor student_logits, Tensor teacher_logits, "
                "float T, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)")
              .c_str(),
          kFlexibleLayout);
  }
}

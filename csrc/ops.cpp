// The dinv operator library: schemas declared once here; each device's kernels register their
// implementations next to the kernels (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA).
// Autograd and fake (meta) kernels are registered from Python (dinv/ops/_native.py).
// The math of every op is in docs/kernels.md.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dinv._C` loads this shared object, which runs the TORCH_LIBRARY static initializers.
// No Python functions are exported: everything is reached through torch.ops.dinv.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dinv, m) {
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("channel_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor");
  m.def(
      "bn_stats_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_stats_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var, "
      "Tensor? weight, Tensor running_var, float eps) -> Tensor");
  m.def("tv_sums(Tensor x, int power) -> Tensor");
  m.def("tv_backward(Tensor x, Tensor coef, int power) -> Tensor");
  m.def("js_rows(Tensor student_logits, Tensor teacher_logits, float T) -> Tensor");
  m.def(
      "js_rows_backward(Tensor grad_rows, Tensor student_logits, Tensor teacher_logits, float T) "
      "-> (Tensor, Tensor)");
  m.def("kd_rows(Tensor student_logits, Tensor teacher_logits, float T) -> Tensor");
  m.def(
      "kd_rows_backward(Tensor grad_rows, Tensor student_logits, Tensor teacher_logits, float T) "
      "-> (Tensor, Tensor)");
}

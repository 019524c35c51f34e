// Every C++ op schema of normface_kernels (docs/contract.md: their math). The same table for
// Python is normface_kernels/schemas.py (the Triton ops are defined from it); a test keeps the
// two equal.
//
// Backends are plain functions registered elsewhere with TORCH_LIBRARY_IMPL:
//   csrc/cpu/      CPU kernels (always built)
//   csrc/chunked/  the chunked path: library GEMMs over class chunks with epilogue kernels; the
//                  CUDA kernels (epilogues in csrc/cuda/, built when a CUDA toolkit is found),
//                  and on CPU tensors after set_cpu_path("chunked")
// Python (normface_kernels/ops.py) registers the fake (meta) kernels and the autograd formulas.
//
// Conventions shared by the loss ops:
//   features (B, D), weight (C, D), labels (B,) int64, scale 0-dim floating tensor.
//   A label equal to ignore_index marks a sample that contributes nothing (loss 0, no gradient).
//   class_start / num_classes let one call see a shard of the classes (rows
//   [class_start, class_start + C) of a larger W with num_classes rows; -1 means C): labels are
//   global ids in [0, num_classes), and a valid label outside the shard means "target elsewhere".
//   The public single-process ops use class_start = 0, num_classes = C.
//   Losses come back in float32 (float64 for float64 inputs); gradients in the input dtype.
//   The backward ops' check_data=False (what autograd passes, normface_kernels/ops.py) skips
//   their data checks on CUDA tensors: the forward checked the same labels and scale, and a
//   training step makes at most one host sync, in the forward (common.h check_values).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "chunked/chunked.h"
#include "common.h"

#ifdef NORMFACE_PYTHON_MODULE
#include <Python.h>
// An empty `normface_kernels._C` Python module: importing it loads this library, and with it
// the op registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace normface {

// cosine_softmax returns only the per-sample loss; the log-sum-exp it also computes is what the
// backward needs, so the public op is a composite of the two-output forward op.
static at::Tensor cosine_softmax_composite(const at::Tensor& features, const at::Tensor& weight,
                                           const at::Tensor& labels, const at::Tensor& scale,
                                           double m1, double m2, double m3, double lam,
                                           bool normalize_features, bool normalize_weight,
                                           int64_t ignore_index) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normface::cosine_softmax_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              double, double, double, bool, bool, int64_t, int64_t, int64_t)>();
  return std::get<0>(op.call(features, weight, labels, scale, m1, m2, m3, lam, normalize_features,
                             normalize_weight, ignore_index, 0, -1));
}

static at::Tensor c_triplet_composite(const at::Tensor& features, const at::Tensor& weight,
                                      const at::Tensor& labels, double margin, bool hardest_only,
                                      bool center, int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("normface::c_triplet_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                           bool, int64_t, int64_t, int64_t)>();
  return std::get<0>(
      op.call(features, weight, labels, margin, hardest_only, center, ignore_index, 0, -1));
}

// s * cos(f_i, W_j) for inference and small C: differentiable through l2_normalize and mm.
static at::Tensor cosine_logits_composite(const at::Tensor& features, const at::Tensor& weight,
                                          const at::Tensor& scale, double eps) {
  static auto normalize = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("normface::l2_normalize", "")
                              .typed<at::Tensor(const at::Tensor&, double)>();
  check_logits_args(features, weight, scale, eps);
  at::Tensor cos = at::mm(normalize.call(features, eps), normalize.call(weight, eps).t());
  return cos * scale.to(cos.scalar_type());
}

// Returns the previous setting (common.h data_checks_flag).
static bool set_data_checks(bool enabled) { return data_checks_flag().exchange(enabled); }

// The chunked path's switches (csrc/chunked/chunked.h); each returns the previous setting.
static std::string set_cpu_path(std::string path) { return chunked::set_cpu_path(path); }
static int64_t set_chunk_budget(int64_t bytes) { return chunked::set_chunk_budget(bytes); }

}  // namespace normface

TORCH_LIBRARY(normface, m) {
  // Data checks (label range, scale value, hardest) on CUDA tensors on/off; returns the
  // previous setting.
  m.def("set_data_checks(bool enabled) -> bool", &normface::set_data_checks);
  // The kernels of the loss ops on CPU tensors: "blocked" (csrc/cpu) or "chunked" (csrc/chunked,
  // the path the CUDA kernels take); and the bytes of the chunked path's per-chunk buffers
  // (0: the default). Both return the previous setting.
  m.def("set_cpu_path(str path) -> str", &normface::set_cpu_path);
  m.def("set_chunk_budget(int bytes) -> int", &normface::set_chunk_budget);

  // Paper eq. 3: x / sqrt(sum x^2 + eps) along the last dim; eq. 4 is its backward.
  m.def("l2_normalize(Tensor x, float eps=1e-12) -> Tensor");
  m.def("l2_normalize_backward(Tensor grad, Tensor x, float eps) -> Tensor");

  m.def("cosine_logits(Tensor features, Tensor weight, Tensor scale, float eps=1e-12) -> Tensor");

  // Scaled cosine softmax with the whole margin family (contract "Cosine softmax with margins").
  m.def(
      "cosine_softmax(Tensor features, Tensor weight, Tensor labels, Tensor scale, "
      "float m1=1.0, float m2=0.0, float m3=0.0, float lam=0.0, bool normalize_features=True, "
      "bool normalize_weight=True, int ignore_index=-100) -> Tensor");
  // loss (B,) and lse (B,) = logsumexp_j z_ij. lse is defined for every row, ignored rows
  // included (over the plain logits, no target margin), so shards can be merged exactly.
  // loss_i = lse_i - z_iy; a row whose target lies in another shard has no z_iy term here, so
  // its loss is lse_i; an ignored row's loss is 0.
  m.def(
      "cosine_softmax_forward(Tensor features, Tensor weight, Tensor labels, Tensor scale, "
      "float m1, float m2, float m3, float lam, bool normalize_features, bool normalize_weight, "
      "int ignore_index, int class_start, int num_classes) -> (Tensor loss, Tensor lse)");
  // dL/dz_ij = grad_loss_i (p_ij - [j == y_i]) + grad_lse_i p_ij, with p = exp(z - lse).
  // An ignored row enters only through a non-zero grad_lse_i; otherwise it contributes nothing,
  // even when its features are NaN or inf (grad_features row 0).
  m.def(
      "cosine_softmax_backward(Tensor grad_loss, Tensor grad_lse, Tensor features, "
      "Tensor weight, Tensor labels, Tensor scale, Tensor lse, float m1, float m2, float m3, "
      "float lam, bool normalize_features, bool normalize_weight, int ignore_index, "
      "int class_start, int num_classes, bool check_data=True) -> (Tensor grad_features, "
      "Tensor grad_weight, Tensor grad_scale)");

  // Agent losses (paper section 4, eq. 10 and 11), d_ij = 2 - 2 cos_ij.
  m.def(
      "c_contrastive(Tensor features, Tensor weight, Tensor labels, float pos_margin=0.0, "
      "float neg_margin=1.0, int ignore_index=-100, int class_start=0, int num_classes=-1) "
      "-> Tensor");
  m.def(
      "c_contrastive_backward(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
      "float pos_margin, float neg_margin, int ignore_index, int class_start, int num_classes, "
      "bool check_data=True) -> (Tensor grad_features, Tensor grad_weight)");

  m.def(
      "c_triplet(Tensor features, Tensor weight, Tensor labels, float margin=0.8, "
      "bool hardest_only=True, bool center=False, int ignore_index=-100) -> Tensor");
  // hardest (B,) int64: local index of the nearest wrong agent (first on ties), -1 when none.
  // A row whose target lies in another shard gets loss 0 and still its hardest local negative.
  m.def(
      "c_triplet_forward(Tensor features, Tensor weight, Tensor labels, float margin, "
      "bool hardest_only, bool center, int ignore_index, int class_start, int num_classes) "
      "-> (Tensor loss, Tensor hardest)");
  m.def(
      "c_triplet_backward(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
      "Tensor hardest, float margin, bool hardest_only, bool center, int ignore_index, "
      "int class_start, int num_classes, bool check_data=True) "
      "-> (Tensor grad_features, Tensor grad_weight)");

  m.def(
      "center_loss(Tensor features, Tensor weight, Tensor labels, int ignore_index=-100, "
      "int class_start=0, int num_classes=-1) -> Tensor");
  m.def(
      "center_loss_backward(Tensor grad_loss, Tensor features, Tensor weight, Tensor labels, "
      "int ignore_index, int class_start, int num_classes, bool check_data=True) "
      "-> (Tensor grad_features, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(normface, CompositeImplicitAutograd, m) {
  m.impl("cosine_softmax", &normface::cosine_softmax_composite);
  m.impl("c_triplet", &normface::c_triplet_composite);
  m.impl("cosine_logits", &normface::cosine_logits_composite);
}

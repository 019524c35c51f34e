// Pieces shared by every backend of normface_kernels: argument checks that name the argument
// (contract "Bad input") and the margin function psi of the contract "Cosine softmax with margins".
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define NF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NF_HOST_DEVICE inline
#endif

namespace normface {

// eps inside the root of every norm: ||x|| = sqrt(sum x^2 + eps) (the contract, paper eq. 3).
constexpr double kNormEps = 1e-12;
// cos(theta) is clamped to [-1 + kCosClamp, 1 - kCosClamp] before arccos.
constexpr double kCosClamp = 1e-7;
constexpr double kPi = 3.14159265358979323846;

// Target logit of the contract: t = (lam * cos + psi(theta)) / (1 + lam), with
//   theta = arccos(clamp(cos)), k = floor((m1 theta + m2) / pi),
//   psi = (-1)^k cos(m1 theta + m2) - 2k - m3.
// Writes t and dt/dcos (k held constant, as it is piecewise; zero slope where the clamp bites,
// as torch.clamp's gradient). Without an angular margin (m1 = 1, m2 = 0) psi = clamp(cos) - m3
// exactly, so no trigonometry is done (NormFace, CosFace).
template <typename T>
NF_HOST_DEVICE void margin_target(T cos, T m1, T m2, T m3, T lam, T* t, T* dt_dcos) {
  const T lo = static_cast<T>(-1.0 + kCosClamp);
  const T hi = static_cast<T>(1.0 - kCosClamp);
  // NaN stays NaN through these comparisons (both are false for NaN).
  const T c = cos < lo ? lo : (cos > hi ? hi : cos);
  const T inside = (cos >= lo && cos <= hi) ? T(1) : T(0);
  T psi, dpsi;
  if (m1 == T(1) && m2 == T(0)) {
    psi = c - m3;
    dpsi = inside;
  } else {
    const T theta = ::acos(c);
    const T angle = m1 * theta + m2;
    const T k = ::floor(angle / static_cast<T>(kPi));
    const T sign = T(1) - T(2) * (k - T(2) * ::floor(k / T(2)));  // (-1)^k
    psi = sign * ::cos(angle) - T(2) * k - m3;
    // d psi / d cos = d psi/d theta * d theta/d cos = (-sign m1 sin(angle)) * (-1/sqrt(1-c^2)).
    dpsi = inside * sign * m1 * ::sin(angle) / ::sqrt(T(1) - c * c);
  }
  *t = (lam * cos + psi) / (T(1) + lam);
  *dt_dcos = (lam + dpsi) / (T(1) + lam);
}

// The factor of a side that is not normalized (normalize_features / normalize_weight false):
// 1, so that z uses the raw dot product, except for an infinite (or NaN) norm: cos is then
// inf / inf, NaN in the contract, not the +-inf of the raw product alone. norm - norm is 0 for a
// finite norm and NaN otherwise (no library call: host and device alike).
template <typename T>
NF_HOST_DEVICE T unnormalized_factor(T norm) {
  const T d = norm - norm;
  return d == d ? T(1) : d;
}

// The switch of the data checks (label range, scale value, hardest range): they read tensor
// data, a host-device sync on CUDA tensors. Off (op normface::set_data_checks, Python
// normface_kernels.set_data_checks) they are skipped on CUDA tensors, so a training step can be
// captured in a CUDA graph; CPU tensors are always checked. With them off, a label outside
// [0, C) reads as a target in another shard.
inline std::atomic<bool>& data_checks_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

// Margins of the cosine softmax (contract "Cosine softmax with margins") and its switches.
struct Margins {
  double m1, m2, m3, lam;
  bool normalize_features, normalize_weight;
};

// contract "Shapes and conventions": accumulate in float32, or float64 for float64 inputs; losses
// and lse come back in this dtype.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// float64 is served on the CPU only (contract: it is there for gradcheck).
inline void check_float64_on_cpu(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.is_cpu() || features.scalar_type() != at::kDouble,
                    "features: float64 is supported on CPU only, got float64 on ",
                    features.device());
}

// Whether t holds data a check can read: not a meta tensor, nor a fake / functional tensor of
// torch.compile tracing (a composite op runs on those before any backend kernel).
inline bool has_data(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return !t.is_meta() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::Functionalize);
}

// check_data: the op's own switch, false in the backward ops that autograd calls
// (normface_kernels/ops.py): their forward checked the same labels and scale. CPU tensors are
// checked whatever the switches say (it costs no sync there, and the blocked CPU kernels index
// with the labels and hardest directly).
inline bool data_checks_on(const at::Tensor& t, bool check_data = true) {
  return has_data(t) &&
         (t.is_cpu() || (check_data && data_checks_flag().load(std::memory_order_relaxed)));
}

// ------------------------------------------------------------------------------------------------
// Argument checks (contract "Bad input"). Every op calls the bundle of its family below before it
// touches memory; each message names the argument. Checks of numbers and metadata are always on
// and cost nothing; the checks that read tensor data (label range, scale value, hardest range) run
// on CPU tensors always and on CUDA tensors while data_checks_on: one host read per op for the
// labels and the scale together (check_values).
// ------------------------------------------------------------------------------------------------

// `name` lives on the device of features. A meta tensor mixed with real ones is an error: the
// dispatcher would otherwise run a kernel on a tensor that has no data.
inline void check_defined(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& features) {
  check_defined(name, t);
  TORCH_CHECK_VALUE(t.device() == features.device(), name, " must be on the device of features (",
                    features.device(), "), got ", t.device());
}

// A number argument that must be finite (margins, hinge margins).
inline void check_finite(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", value);
}

// Margins (contract): m1 >= 1 (psi is monotone on [0, pi] only then), m2, m3 finite, lam >= 0.
inline void check_margins(double m1, double m2, double m3, double lam) {
  TORCH_CHECK_VALUE(std::isfinite(m1) && m1 >= 1.0, "m1 must be finite and >= 1, got ", m1);
  check_finite("m2", m2);
  check_finite("m3", m3);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0, "lam must be finite and >= 0, got ", lam);
}

// eps inside the root of a norm: finite and >= 0 (a negative eps can make the root NaN).
inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ", eps);
}

// Rows [class_start, class_start + C) of num_classes (-1 means C), without int64 overflow.
inline int64_t check_shard(int64_t class_start, int64_t num_classes, const at::Tensor& weight) {
  const int64_t C = weight.size(0);
  TORCH_CHECK_VALUE(num_classes >= -1, "num_classes must be -1 (meaning C) or >= C = ", C, ", got ",
                    num_classes);
  const int64_t n = num_classes < 0 ? C : num_classes;
  // class_start + C <= n written as class_start <= n - C: n >= 0 and C >= 0 cannot overflow.
  TORCH_CHECK_VALUE(
      class_start >= 0 && n >= C && class_start <= n - C,
      "class_start/num_classes must describe a shard of the classes, got class_start ", class_start,
      ", num_classes ", n, " for weight ", weight.sizes());
  return n;
}

// features (B, D) floating and weight (C, D) of its dtype, on its device, with C > 0: the pair
// every op over features and agents takes (the losses, cosine_logits).
inline void check_pair(const at::Tensor& features, const at::Tensor& weight) {
  check_defined("features", features);
  check_defined("weight", weight);
  TORCH_CHECK_VALUE(features.dim() == 2, "features must be 2-D (B, D), got shape ",
                    features.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (C, D), got shape ", weight.sizes());
  check_device("weight", weight, features);
  TORCH_CHECK_VALUE(features.size(1) == weight.size(1),
                    "features and weight must have the same D, got features ", features.sizes(),
                    " and weight ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight must have at least one class (C > 0), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(features.scalar_type()),
                    "features must be a floating tensor, got ", features.scalar_type());
  TORCH_CHECK_VALUE(features.scalar_type() == weight.scalar_type(),
                    "weight must have the dtype of features (", features.scalar_type(), "), got ",
                    weight.scalar_type());
}

// The metadata checks of every loss op: the pair, labels (B,) int64 on features' device, the
// shard. Returns num_classes (the labels' range, read by check_values).
inline int64_t check_loss_inputs(const at::Tensor& features, const at::Tensor& weight,
                                 const at::Tensor& labels, int64_t class_start,
                                 int64_t num_classes) {
  check_pair(features, weight);
  check_defined("labels", labels);
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must be 1-D (B,), got shape ", labels.sizes());
  check_device("labels", labels, features);
  TORCH_CHECK_VALUE(labels.size(0) == features.size(0),
                    "labels must have one entry per row of features, got labels ", labels.sizes(),
                    " and features ", features.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                    labels.scalar_type());
  return check_shard(class_start, num_classes, weight);
}

// scale: one floating number (a 0-dim tensor) on the device of features, or a CPU number
// next to accelerator features (never next to meta ones). Its value is check_values'.
inline void check_scale(const at::Tensor& scale, const at::Tensor& features) {
  check_defined("scale", scale);
  TORCH_CHECK_VALUE(scale.numel() == 1, "scale must be a single number (0-dim tensor), got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(scale.scalar_type()), "scale must be floating, got ",
                    scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == features.device() || (scale.is_cpu() && !features.is_meta()),
                    "scale must be on the device of features (", features.device(), "), got ",
                    scale.device());
}

// The data checks of an op: labels (if defined) in [0, n) or equal to ignore_index, scale (if
// defined) finite and > 0. A label outside the range must raise, never index out of bounds. The
// flags of both are stacked and read at once: one host-device sync on CUDA tensors (none while
// data_checks_on is false); the error path reads more to name the bad value.
inline void check_values(const at::Tensor& labels, int64_t ignore_index, int64_t n,
                         const at::Tensor& scale, bool check_data) {
  const bool read_labels =
      labels.defined() && labels.numel() > 0 && data_checks_on(labels, check_data);
  bool read_scale = scale.defined() && data_checks_on(scale, check_data);
  if (read_scale && read_labels && scale.device() != labels.device()) {
    // A CPU number next to CUDA labels: reading it costs no sync, and no copy is needed.
    const double value = scale.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(value) && value > 0.0, "scale must be finite and > 0, got ",
                      value);
    read_scale = false;
  }
  if (!read_labels && !read_scale) return;
  at::Tensor bad_labels;
  std::vector<at::Tensor> flags;
  if (read_labels) {
    bad_labels = (labels != ignore_index) & ((labels < 0) | (labels >= n));
    flags.push_back(bad_labels.any());
  }
  if (read_scale) {
    const at::Tensor s = scale.reshape({});
    flags.push_back(at::isfinite(s).logical_and(s > 0).logical_not());
  }
  const at::Tensor read = at::stack(flags).to(at::kCPU);  // the one host read
  const bool* bad = read.data_ptr<bool>();
  if (read_labels) {
    TORCH_CHECK_VALUE(!bad[0], "labels must be in [0, ", n, ") or equal ignore_index (",
                      ignore_index, "); got ",
                      labels.masked_select(bad_labels).flatten()[0].item<int64_t>());
  }
  if (read_scale) {
    TORCH_CHECK_VALUE(!bad[read_labels ? 1 : 0], "scale must be finite and > 0, got ",
                      scale.item<double>());
  }
}

// A per-sample tensor of a backward op (grad_loss, grad_lse, lse): floating, shape (B,).
inline void check_per_sample(const char* name, const at::Tensor& t, const at::Tensor& features) {
  check_device(name, t, features);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == features.size(0), name,
                    " must have shape (B,) = (", features.size(0), "), got ", t.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating, got ",
                    t.scalar_type());
}

// c_triplet's hardest (B,) int64: a local class in [0, C) or -1 (data check for the range).
inline void check_hardest(const at::Tensor& hardest, const at::Tensor& features,
                          const at::Tensor& weight, bool check_data) {
  check_device("hardest", hardest, features);
  TORCH_CHECK_VALUE(hardest.dim() == 1 && hardest.size(0) == features.size(0) &&
                        hardest.scalar_type() == at::kLong,
                    "hardest must be int64 of shape (B,) = (", features.size(0), "), got ",
                    hardest.scalar_type(), " of shape ", hardest.sizes());
  if (hardest.numel() > 0 && data_checks_on(hardest, check_data)) {
    const at::Tensor bad = (hardest < -1) | (hardest >= weight.size(0));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "hardest must be in [-1, ", weight.size(0),
                      "), got ", hardest.masked_select(bad).flatten()[0].item<int64_t>());
  }
}

// ---- One bundle per op family (the CPU and CUDA kernels call these) ----------------------------
// check_data: false in a backward op called by autograd (data_checks_on above).

inline void check_normalize_args(const at::Tensor& x, double eps) {
  check_defined("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be floating, got ",
                    x.scalar_type());
  check_eps(eps);
}

inline void check_normalize_backward_args(const at::Tensor& grad, const at::Tensor& x, double eps) {
  check_normalize_args(x, eps);
  check_defined("grad", grad);
  TORCH_CHECK_VALUE(grad.device() == x.device(), "grad must be on the device of x (", x.device(),
                    "), got ", grad.device());
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have the shape of x, got grad ",
                    grad.sizes(), " and x ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()), "grad must be floating, got ",
                    grad.scalar_type());
}

// cosine_logits: features (B, D), weight (C, D) with C > 0, one scale, eps.
inline void check_logits_args(const at::Tensor& features, const at::Tensor& weight,
                              const at::Tensor& scale, double eps) {
  check_pair(features, weight);
  check_scale(scale, features);
  check_eps(eps);
  check_values(at::Tensor(), 0, 0, scale, /*check_data=*/true);
}

inline void check_softmax_forward_args(const at::Tensor& features, const at::Tensor& weight,
                                       const at::Tensor& labels, const at::Tensor& scale, double m1,
                                       double m2, double m3, double lam, int64_t ignore_index,
                                       int64_t class_start, int64_t num_classes,
                                       bool check_data = true) {
  check_margins(m1, m2, m3, lam);
  const int64_t n = check_loss_inputs(features, weight, labels, class_start, num_classes);
  check_scale(scale, features);
  check_values(labels, ignore_index, n, scale, check_data);
}

inline void check_softmax_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                        const at::Tensor& features, const at::Tensor& weight,
                                        const at::Tensor& labels, const at::Tensor& scale,
                                        const at::Tensor& lse, double m1, double m2, double m3,
                                        double lam, int64_t ignore_index, int64_t class_start,
                                        int64_t num_classes, bool check_data) {
  check_softmax_forward_args(features, weight, labels, scale, m1, m2, m3, lam, ignore_index,
                             class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  check_per_sample("grad_lse", grad_lse, features);
  check_per_sample("lse", lse, features);
}

// c_contrastive (pos_margin, neg_margin), c_triplet (margin) and center_loss (no margin).
inline void check_agent_args(const at::Tensor& features, const at::Tensor& weight,
                             const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                             int64_t num_classes, bool check_data = true) {
  const int64_t n = check_loss_inputs(features, weight, labels, class_start, num_classes);
  check_values(labels, ignore_index, n, at::Tensor(), check_data);
}

inline void check_contrastive_args(const at::Tensor& features, const at::Tensor& weight,
                                   const at::Tensor& labels, double pos_margin, double neg_margin,
                                   int64_t ignore_index, int64_t class_start, int64_t num_classes,
                                   bool check_data = true) {
  check_finite("pos_margin", pos_margin);
  check_finite("neg_margin", neg_margin);
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes, check_data);
}

inline void check_triplet_args(const at::Tensor& features, const at::Tensor& weight,
                               const at::Tensor& labels, double margin, int64_t ignore_index,
                               int64_t class_start, int64_t num_classes) {
  check_finite("margin", margin);
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes);
}

inline void check_triplet_backward_args(const at::Tensor& grad_loss, const at::Tensor& features,
                                        const at::Tensor& weight, const at::Tensor& labels,
                                        const at::Tensor& hardest, double margin, bool hardest_only,
                                        int64_t ignore_index, int64_t class_start,
                                        int64_t num_classes, bool check_data) {
  check_finite("margin", margin);
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  if (hardest_only) check_hardest(hardest, features, weight, check_data);
}

// ---------------------------------------------------------------------------------------------
// Per-element math of the chunked path (csrc/chunked), shared by its CPU and CUDA epilogues.
//
// A backward recomputes the logits (and agent distances) of its forward and must get the same
// bits: every expression here that a backward recomputes is a product chain or a single
// difference, so no compiler can contract it into a fused multiply-add differently in the two
// passes (e.g. d = 2 (1 - cos) instead of 2 - 2 cos: the same number, as scaling by 2 is exact).
// ---------------------------------------------------------------------------------------------

// A_i (B_j S_ij): a raw dot product S_ij = <f_i, W_j> scaled by a row and a column factor. With
// A_i = 1/||f_i||, B_j = 1/||W_j|| it is cos_ij; the softmax uses A_i = 1/||f_i|| or 1 and
// B_j = 1/||W_j|| or 1, so that v_ij = a_i b_j cos_ij and z_ij = s v_ij (docs/kernels.md).
template <typename T>
NF_HOST_DEVICE T scaled_dot(T dot, T row, T col) {
  return row * (col * dot);
}

// Agent distance d = ||f~ - W~||^2 = 2 - 2 cos (paper section 4), as 2 (1 - cos).
template <typename T>
NF_HOST_DEVICE T agent_distance(T cos) {
  return T(2) * (T(1) - cos);
}

// torch.relu with NaN propagation (`x > 0 ? x : (x != x ? x : 0)`); slope 0 at 0.
template <typename T>
NF_HOST_DEVICE T relu_nan(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

// The hinge relu_nan(bound - d) of the agent losses: bound = neg_margin (C-contrastive
// negatives) or margin + d_iy (C-triplet); its slope in -d is [bound - d > 0].
template <typename T>
NF_HOST_DEVICE T hinge(T bound, T d) {
  return relu_nan(bound - d);
}
template <typename T>
NF_HOST_DEVICE bool hinge_active(T bound, T d) {
  return bound - d > T(0);
}

// argmin order of torch.argmin: NaN wins, then the smaller distance, then the smaller index.
// Index -1 means "no candidate yet". True when (da, ja) comes strictly before (db, jb).
template <typename T>
NF_HOST_DEVICE bool argmin_before(T da, int64_t ja, T db, int64_t jb) {
  if (ja < 0) return false;
  if (jb < 0) return true;
  const bool na = da != da, nb = db != db;
  if (na || nb) return na && (!nb || ja < jb);
  return da < db || (da == db && ja < jb);
}

// Online logsumexp (docs/kernels.md): (m, l) is a running max and sum of exp(z - m). A NaN
// anywhere makes the pair NaN (contract: NaN in, NaN out); -inf entries add nothing.
template <typename T, typename Exp>
NF_HOST_DEVICE void lse_add(T& m, T& l, T z, Exp exp_fn) {
  if (z > m) {
    l = l * exp_fn(m - z) + T(1);
    m = z;
  } else if (z != z || z > -INFINITY) {
    l += exp_fn(z - m);
  }
}

// Merges the pair (m2, l2) into (m, l).
template <typename T, typename Exp>
NF_HOST_DEVICE void lse_merge(T& m, T& l, T m2, T l2, Exp exp_fn) {
  if (m2 != m2 || l2 != l2 || m != m || l != l) {
    m = l = m2 + l2 + m + l;  // NaN
    return;
  }
  const T mx = m2 > m ? m2 : m;
  if (mx == -INFINITY) return;  // both empty
  l = l * exp_fn(m - mx) + l2 * exp_fn(m2 - mx);
  m = mx;
}

}  // namespace normface

// Pieces shared by every backend of normface_kernels: argument checks that name the argument
// (SPEC "Bad input") and the margin function psi of SPEC "Cosine softmax with margins".
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NF_HOST_DEVICE inline
#endif

namespace normface {

// eps inside the root of every norm: ||x|| = sqrt(sum x^2 + eps) (SPEC, paper eq. 3).
constexpr double kNormEps = 1e-12;
// cos(theta) is clamped to [-1 + kCosClamp, 1 - kCosClamp] before arccos.
constexpr double kCosClamp = 1e-7;
constexpr double kPi = 3.14159265358979323846;

// Target logit of SPEC: t = (lam * cos + psi(theta)) / (1 + lam), with
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

// The switch of the data checks (label range, finite scale): they read tensor data, a host-device
// sync on CUDA tensors. Off (op normface::set_data_checks, Python normface_kernels.set_data_checks)
// they are skipped on CUDA tensors, so a training step can be captured in a CUDA graph; CPU tensors
// are always checked. With them off, a label outside [0, C) reads as a target in another shard.
inline std::atomic<bool>& data_checks_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

inline bool data_checks_on(const at::Tensor& t) {
  return t.is_cpu() || data_checks_flag().load(std::memory_order_relaxed);
}

inline int64_t resolve_num_classes(int64_t num_classes, const at::Tensor& weight) {
  return num_classes < 0 ? weight.size(0) : num_classes;
}

// The checks every loss op makes before touching memory. Messages name the argument.
inline void check_loss_inputs(const at::Tensor& features, const at::Tensor& weight,
                              const at::Tensor& labels, int64_t ignore_index,
                              int64_t class_start, int64_t num_classes) {
  TORCH_CHECK(features.dim() == 2, "features must be 2-D (B, D), got shape ", features.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (C, D), got shape ", weight.sizes());
  TORCH_CHECK(labels.dim() == 1, "labels must be 1-D (B,), got shape ", labels.sizes());
  TORCH_CHECK(features.size(1) == weight.size(1),
              "features and weight must have the same D, got features ", features.sizes(),
              " and weight ", weight.sizes());
  TORCH_CHECK(labels.size(0) == features.size(0),
              "labels must have one entry per row of features, got labels ", labels.sizes(),
              " and features ", features.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one class (C > 0), got shape ",
              weight.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()),
              "features must be a floating tensor, got ", features.scalar_type());
  TORCH_CHECK(features.scalar_type() == weight.scalar_type(),
              "features and weight must have the same dtype, got ", features.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(features.device() == weight.device() && features.device() == labels.device(),
              "features, weight and labels must be on one device, got ", features.device(), ", ",
              weight.device(), " and ", labels.device());
  const int64_t n = num_classes < 0 ? weight.size(0) : num_classes;
  TORCH_CHECK(class_start >= 0 && class_start + weight.size(0) <= n,
              "class_start/num_classes must describe a shard of the classes, got class_start ",
              class_start, ", num_classes ", n, " for weight ", weight.sizes());
  if (labels.numel() > 0 && data_checks_on(labels)) {
    // One host sync: a label outside [0, num_classes) must raise, never index out of bounds.
    const at::Tensor bad = (labels != ignore_index) & ((labels < 0) | (labels >= n));
    TORCH_CHECK(!bad.any().item<bool>(), "labels must be in [0, ", n,
                ") or equal ignore_index (", ignore_index, "); got ",
                labels.masked_select(bad).flatten()[0].item<int64_t>());
  }
}

inline void check_scale(const at::Tensor& scale, const at::Tensor& features) {
  TORCH_CHECK(scale.numel() == 1, "scale must be a single number (0-dim tensor), got shape ",
              scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be floating, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == features.device() || scale.device().is_cpu(),
              "scale must be on the device of features (", features.device(), "), got ",
              scale.device());
  if (data_checks_on(scale)) {
    const double value = scale.item<double>();
    TORCH_CHECK(std::isfinite(value), "scale must be finite, got ", value);
  }
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
// anywhere makes the pair NaN (SPEC: NaN in, NaN out); -inf entries add nothing.
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

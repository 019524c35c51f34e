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

}  // namespace normface

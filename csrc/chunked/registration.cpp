// Where the chunked path is registered: the CUDA kernels of every loss op (and of l2_normalize),
// and, on demand, the CPU kernels (set_cpu_path("chunked") puts this path in front of the blocked
// CPU kernels of csrc/cpu; "blocked" removes it again).
#include <torch/library.h>

#include <memory>
#include <mutex>

#include "chunked/chunked.h"

namespace normface {
namespace chunked {

void register_kernels(torch::Library& m) {
  m.impl("l2_normalize", &l2_normalize);
  m.impl("l2_normalize_backward", &l2_normalize_backward);
  m.impl("cosine_softmax_forward", &cosine_softmax_forward);
  m.impl("cosine_softmax_backward", &cosine_softmax_backward);
  m.impl("c_contrastive", &c_contrastive);
  m.impl("c_contrastive_backward", &c_contrastive_backward);
  m.impl("c_triplet_forward", &c_triplet_forward);
  m.impl("c_triplet_backward", &c_triplet_backward);
  m.impl("center_loss", &center_loss);
  m.impl("center_loss_backward", &center_loss_backward);
}

std::string set_cpu_path(const std::string& path) {
  TORCH_CHECK_VALUE(path == "blocked" || path == "chunked",
                    "set_cpu_path: path must be \"blocked\" or \"chunked\", got \"", path, "\"");
  static std::mutex mutex;
  // A registration of this path's kernels for the CPU key, in front of the blocked ones while it
  // lives (the dispatcher restores the previous kernel when it is destroyed). Never destroyed at
  // exit: no deregistration against a dispatcher that is being torn down.
  static torch::Library* cpu_kernels = nullptr;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::string previous = cpu_kernels != nullptr ? "chunked" : "blocked";
  if (path == "chunked" && cpu_kernels == nullptr) {
    cpu_kernels = new torch::Library(torch::Library::IMPL, "normface", c10::DispatchKey::CPU,
                                     __FILE__, __LINE__);
    register_kernels(*cpu_kernels);
  } else if (path == "blocked" && cpu_kernels != nullptr) {
    delete cpu_kernels;
    cpu_kernels = nullptr;
  }
  return previous;
}

}  // namespace chunked
}  // namespace normface

#ifdef NORMFACE_WITH_CUDA
TORCH_LIBRARY_IMPL(normface, CUDA, m) { normface::chunked::register_kernels(m); }
#endif

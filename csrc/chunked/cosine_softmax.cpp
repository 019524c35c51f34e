// cosine_softmax_forward / cosine_softmax_backward on the chunked path (docs/kernels.md "Chunked
// path"): per chunk of classes, S = f W_c^T from the library GEMM and one epilogue kernel.
//
//   forward    z_ij = s A_i B_j S_ij (target column: z_iy), merged into a running (max, sum)
//   backward   S again; P = dL/dS in place; grad f += P W_c; V = P^T f; grad W_c from V (eq. 4)
//
// with A_i = 1/||f_i|| or 1 and B_j = 1/||W_j|| or 1 (normalize_features / normalize_weight), so
// that A_i B_j S_ij = a_i b_j cos_ij. P_ij = G_ij s A_i B_j (dt_i at the target), hence
//   U_i = sum_j P_ij W_j = grad f~_i / ||f_i||,   V_j = sum_i P_ij f_i = grad W~_j / ||W_j||
// and the normalization backward (eq. 4) needs no other factor. A side that is not normalized
// enters z linearly except through the target logit: its gradient is U (or V) plus the target's
// term s G_iy (t_i - dt_i cos_iy) (b_y f~_i, or sum over the rows of class j of a_i W~_j).
#include "chunked/chunked.h"

#include <limits>

namespace normface {
namespace chunked {
namespace {

// What both passes compute the same way from the same inputs (so the backward's logits are
// bit-identical to the forward's): local targets, norms, the row table.
struct Setup {
  Targets targets;
  at::Tensor f, w;  // contiguous inputs
  at::Tensor nf, inv_nf, nw, inv_nw;
  SoftmaxTerms terms;

  Setup(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
        const at::Tensor& scale, const Margins& mg, int64_t ignore_index, int64_t class_start)
      : f(features.contiguous()), w(weight.contiguous()) {
    const at::ScalarType acc = acc_dtype(f.scalar_type());
    targets = local_targets(labels, ignore_index, class_start, w.size(0));
    std::tie(nf, inv_nf) = norms(f);
    std::tie(nw, inv_nw) = norms(w);
    const at::Tensor cos_y = pair_cosines(f, w, targets.target, inv_nf, inv_nw);
    terms.target = targets.target;
    terms.scale = device_scale(scale, f, acc);
    terms.table = at::empty({kSoftmaxRowFields, f.size(0)}, inv_nf.options());
    NF_ON_DEVICE(f, softmax_rows, cos_y, targets.target, nf, nw, terms.scale, mg, terms.table);
    // B_j: 1/||W_j||, or common.h unnormalized_factor (1, NaN for an infinite norm).
    terms.col_factor = mg.normalize_weight
                           ? inv_nw
                           : at::where(at::isfinite(nw), at::ones_like(nw),
                                       at::full_like(nw, std::numeric_limits<double>::quiet_NaN()));
  }

  at::Tensor field(SoftmaxRowField k) const { return terms.table[k]; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_softmax_forward(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& scale, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  check_softmax_forward_args(features, weight, labels, scale, m1, m2, m3, lam, ignore_index,
                             class_start, num_classes);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = features.size(0);
  const auto acc_opts = features.options().dtype(acc_dtype(features.scalar_type()));
  if (B == 0) return {at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  const Margins mg{m1, m2, m3, lam, normalize_features, normalize_weight};
  const Setup st(features, weight, labels, scale, mg, ignore_index, class_start);

  const at::Tensor f_op =
      gemm_features(st.f, at::Tensor(), operand_dtype(st.f.scalar_type(), st.f.device()));
  ChunkWalk walk(f_op, st.w);
  // Each worker's running (max, sum) in float64: the chunks' partial sums are added to it one by
  // one, and a float32 sum near 1 would drop each chunk's share below its rounding.
  const auto run_opts = acc_opts.dtype(at::kDouble);
  at::Tensor run_max =
      at::full({walk.workers, B}, -std::numeric_limits<double>::infinity(), run_opts);
  at::Tensor run_sum = at::zeros({walk.workers, B}, run_opts);
  walk.run([&](int64_t t, ChunkWorker& worker, int64_t j0, int64_t n) {
    const at::Tensor S = worker.logits(j0, n);
    at::Tensor m = run_max[t], l = run_sum[t];
    NF_ON_DEVICE(S, softmax_forward_chunk, S, j0, st.terms, m, l);
  });
  // The workers' pairs merged (lse_merge as tensor ops; NaN propagates through amax).
  const at::Tensor m = run_max.amax(0);
  const at::Tensor l = (run_sum * (run_max - m).exp()).sum(0);
  // lse is defined for every row (ignored ones too, over the plain logits); loss = lse - z_iy,
  // or lse when the target is in another shard, and exactly 0 on ignored rows (a select).
  const at::Tensor lse = (m + l.log()).to(acc_opts.dtype());
  const at::Tensor own = at::where(st.targets.has, lse - st.field(kZ), lse);
  const at::Tensor loss = at::where(st.targets.valid, own, at::zeros_like(own));
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_softmax_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& features,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& lse, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes,
    bool check_data) {
  check_softmax_backward_args(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2, m3,
                              lam, ignore_index, class_start, num_classes, check_data);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = features.size(0), C = weight.size(0), D = features.size(1);
  const at::ScalarType acc = acc_dtype(features.scalar_type());
  at::Tensor grad_w = at::empty({C, D}, weight.options());
  if (B == 0) return {at::empty({0, D}, features.options()), grad_w.zero_(), at::zeros_like(scale)};
  const Margins mg{m1, m2, m3, lam, normalize_features, normalize_weight};
  const Setup st(features, weight, labels, scale, mg, ignore_index, class_start);
  const at::Tensor& s = st.terms.scale;

  // Upstream gradients: g = 0 on ignored rows. Rows with no gradient at all are inactive: their
  // P, row sums and target terms are exact zeros (selects), whatever NaN their features hold.
  SoftmaxTerms t = st.terms;
  t.g = at::where(st.targets.valid, grad_loss.to(acc), at::zeros({}, s.options())).contiguous();
  t.e = grad_lse.to(acc).contiguous();
  t.active = t.g.ne(0).logical_or(t.e.ne(0));
  t.lse = lse.to(acc).contiguous();
  t.input_dtype = features.scalar_type();
  const at::Tensor zero = at::zeros({}, s.options());

  // The target's own terms (docs above): G_iy, and t_i - dt_i cos_iy for the unnormalized sides.
  const at::Tensor p_y = (st.field(kZ) - t.lse).exp();
  const at::Tensor target_rows = st.targets.has.logical_and(t.active);
  const at::Tensor G_y = at::where(target_rows, (t.g + t.e) * p_y - t.g, zero);
  FinishArgs to_f, to_w;
  if (!normalize_features) {
    to_f.coef = at::where(target_rows, s * G_y * st.field(kBy) * st.field(kTmc), zero);
  }
  if (!normalize_weight) {
    // sum over the rows whose target is class j; inactive rows add an exact 0 (select).
    const at::Tensor q = at::where(target_rows, G_y * st.field(kA) * st.field(kTmc), zero);
    const at::Tensor slot = at::where(st.targets.has, st.targets.target,
                                      at::scalar_tensor(C, st.targets.target.options()));
    to_w.coef = (at::zeros({C + 1}, s.options()).index_add_(0, slot, q) * s).narrow(0, 0, C);
  }

  // float16: P scaled into float16's range; |P_ij| <= (|g_i| + |e_i|) A_i max(1, |dt_i|) |s| B_j.
  if (features.scalar_type() == at::kHalf) {
    const at::Tensor row =
        (t.g.abs() + t.e.abs()) * st.field(kRow) * st.field(kDt).abs().clamp_min(1);
    at::Tensor bound = at::where(t.active, row, zero).amax() * s.abs();
    if (normalize_weight) bound = bound * st.inv_nw.amax();
    at::Tensor inverse;
    std::tie(t.gc_scale, inverse) = float16_grad_scale(features.scalar_type(), bound);
    to_f.u_scale = to_w.u_scale = inverse;
  }

  const at::Tensor f_op =
      gemm_features(st.f, t.active, operand_dtype(st.f.scalar_type(), st.f.device()));
  ChunkWalk walk(f_op, st.w);
  at::Tensor row_acc = at::zeros({walk.workers, B}, s.options());
  at::Tensor U = at::zeros({walk.workers, B, D}, s.options());
  to_w.x = st.w;
  to_w.inv_norm = st.inv_nw;
  to_w.project = normalize_weight;
  to_w.out = grad_w;
  walk.run([&](int64_t worker_index, ChunkWorker& worker, int64_t j0, int64_t n) {
    const at::Tensor S = worker.logits(j0, n);
    at::Tensor P = worker.grad_operand(S);
    at::Tensor acc = row_acc[worker_index], U_part = U[worker_index];
    NF_ON_DEVICE(S, softmax_backward_chunk, S, P, j0, t, acc);
    worker.add_grad_features(U_part, P);
    finish_rows(worker.grad_weight(P), j0, at::Tensor(), to_w);
  });
  at::Tensor grad_f = at::empty({B, D}, st.f.options());
  to_f.x = st.f;
  to_f.inv_norm = st.inv_nf;
  to_f.project = normalize_features;
  to_f.keep = t.active;
  to_f.out = grad_f;
  finish_rows(U.sum(0), 0, at::Tensor(), to_f);
  // dL/ds = sum_ij G_ij a_i b_j h_ij = sum_i row_acc_i, on the device (no sync).
  const at::Tensor grad_s = row_acc.sum().to(scale.options()).reshape(scale.sizes());
  return {grad_f, grad_w, grad_s};
}

}  // namespace chunked
}  // namespace normface

// The agent losses on the chunked path (paper section 4, eq. 10 and 11; contract "Agent losses"):
// both sides normalized, d_ij = 2 - 2 cos_ij, and every backward written with Gc_ij = dL/dcos_ij.
//
//   dense (a chunk loop with library GEMMs, as the softmax):
//     c_contrastive             hinge(neg_margin, d_ij) over the negatives; the target in place
//     c_triplet, all negatives  hinge(margin + d_iy, d_ik); the target's Gc needs the number of
//                               active hinges, known after the loop: a sparse term
//     c_triplet, hardest (fwd)  a running argmin over the chunks
//   sparse (two rows of W per sample at most, no GEMM, no (C, D) buffer):
//     c_triplet hardest (bwd), center_loss
//
// A sparse term coef of the pair (i, k) adds coef W~_k to grad f~_i and coef f~_i to grad W~_k.
// The W side is gathered per class into `held` rows (one per class: its first entry), which the
// chunk loop also fills with the class's dense part, then goes through eq. 4 once.
//
// Shards (registration.cpp): c_contrastive sums its local negatives for a row whose target is
// elsewhere; c_triplet gives it loss 0 and still its hardest local negative; center_loss gives 0.
// Ignored rows: loss 0, hardest -1, exact zeros in every gradient (selects).
#include "chunked/chunked.h"

#include <limits>

namespace normface {
namespace chunked {
namespace {

// The sparse ops (center_loss, c_triplet hardest backward) read two rows of W per sample at
// most: only their classes' norms are computed, into (C,) vectors that hold nothing else.
enum class AgentNorms { kAll, kTargets, kTargetsAndHardest };

// c_triplet's hardest (B,) with every value outside [0, C) read as -1, "none" (its range is a
// data check that a backward op may skip: nothing may be read out of bounds).
at::Tensor hardest_in_range(const at::Tensor& hardest, int64_t C) {
  return at::where(hardest.ge(0).logical_and(hardest.lt(C)), hardest,
                   at::scalar_tensor(-1, hardest.options()));
}

// What every pass computes the same way: local targets, norms, the target distances d_iy.
struct Setup {
  Targets targets;
  at::Tensor f, w;  // contiguous inputs
  at::Tensor nf, inv_nf, nw, inv_nw;
  at::Tensor d_y;  // (B,) d_iy from a direct dot (0 where the target is not here)
  int64_t B, C, D;

  // hardest: the c_triplet backward's (B,) hardest negatives (kTargetsAndHardest).
  Setup(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
        int64_t ignore_index, int64_t class_start, AgentNorms which = AgentNorms::kAll,
        const at::Tensor& hardest = at::Tensor())
      : f(features.contiguous()), w(weight.contiguous()), B(features.size(0)), C(weight.size(0)),
        D(features.size(1)) {
    targets = local_targets(labels, ignore_index, class_start, C);
    std::tie(nf, inv_nf) = norms(f);
    if (which == AgentNorms::kAll) {
      std::tie(nw, inv_nw) = norms(w);
    } else {
      at::Tensor classes = targets.target;
      if (which == AgentNorms::kTargetsAndHardest) {
        classes = at::cat({classes, hardest_in_range(hardest, C)});
      }
      std::tie(nw, inv_nw) = class_norms(classes);
    }
    d_y = distances(targets.target);
  }

  // ||W_k|| and its inverse at the listed classes k >= 0 (-1: none), zeros elsewhere: one row of
  // W per entry instead of all C (equal classes write the same value).
  std::tuple<at::Tensor, at::Tensor> class_norms(const at::Tensor& classes) const {
    const at::Tensor k = at::where(classes.ge(0), classes, at::zeros_like(classes));
    at::Tensor norm, inv;
    std::tie(norm, inv) = norms(w.index_select(0, k));
    at::Tensor all_norm = at::zeros({C}, norm.options()), all_inv = at::zeros({C}, inv.options());
    return {all_norm.index_copy_(0, k, norm), all_inv.index_copy_(0, k, inv)};
  }

  // d_ik = 2 (1 - cos_ik) (common.h agent_distance) for the listed classes (-1: none).
  at::Tensor distances(const at::Tensor& index) const {
    return (1.0 - pair_cosines(f, w, index, inv_nf, inv_nw)) * 2.0;
  }

  at::TensorOptions acc_opts() const { return inv_nf.options(); }
  at::Tensor zero() const { return at::zeros({}, acc_opts()); }

  AgentTerms terms(const at::Tensor& bound) const {
    AgentTerms t;
    t.target = targets.target;
    t.inv_nf = inv_nf;
    t.inv_nw = inv_nw;
    t.bound = bound.contiguous();
    t.input_dtype = f.scalar_type();
    return t;
  }

  at::ScalarType op() const { return operand_dtype(f.scalar_type(), f.device()); }
};

// Upstream gradient, 0 where `rows` is false (select), in the acc dtype.
at::Tensor upstream(const at::Tensor& grad_loss, const at::Tensor& rows, const Setup& st) {
  return at::where(rows, grad_loss.to(st.acc_opts().dtype()), st.zero()).contiguous();
}

// Per-class rows that gather the W side of the sparse terms (see the file comment).
struct Held {
  at::Tensor key;       // (E,) class of each entry, -1: none
  at::Tensor slot;      // (E,) the held row of the entry's class
  at::Tensor redirect;  // (C,) held row of a class, -1 for classes without an entry
  at::Tensor finish;    // (E,) class to finish from held row e (its owner), else -1
  at::Tensor rows;      // (E, D) acc

  Held(const at::Tensor& key_in, const Setup& st) : key(key_in.contiguous()) {
    const int64_t E = key.size(0);
    const auto long_opts = key.options();
    const at::Tensor key_or_c = at::where(key.ge(0), key, at::scalar_tensor(st.C, long_opts));
    const at::Tensor entries = at::arange(E, long_opts);
    // The first entry of each class owns its row: no host sync, deterministic.
    const at::Tensor owner =
        at::full({st.C + 1}, E, long_opts).scatter_reduce_(0, key_or_c, entries, "amin", true);
    slot = owner.index_select(0, key_or_c);
    const at::Tensor owner_c = owner.narrow(0, 0, st.C);
    redirect = at::where(owner_c.lt(E), owner_c, at::scalar_tensor(-1, long_opts));
    finish =
        at::where(key.ge(0).logical_and(slot.eq(entries)), key, at::scalar_tensor(-1, long_opts));
    rows = at::zeros({E, st.D}, st.acc_opts());
  }
};

// The sparse terms coef_e of the pairs (row_e, key_e): U += gc_scale coef W~_key / ||f_row|| and
// held[slot] += coef f~_row / ||W_key||. Entries with key < 0 or coef == 0 add exact zeros.
void add_sparse(const Setup& st, const at::Tensor& row, const Held& held, const at::Tensor& coef,
                const at::Tensor& gc_scale, at::Tensor& U) {
  const at::Tensor live = held.key.ge(0).logical_and(coef.ne(0)).unsqueeze(1);
  const at::Tensor k = at::where(held.key.ge(0), held.key, at::zeros_like(held.key));
  const at::Tensor c = coef * st.inv_nf.index_select(0, row) * st.inv_nw.index_select(0, k);
  const at::Tensor zero = st.zero();
  at::Tensor to_f =
      at::where(live, c.unsqueeze(1) * st.w.index_select(0, k).to(c.scalar_type()), zero);
  if (gc_scale.defined()) to_f = to_f * gc_scale;
  U.index_add_(0, row, to_f);
  const at::Tensor to_w =
      at::where(live, c.unsqueeze(1) * st.f.index_select(0, row).to(c.scalar_type()), zero);
  held.rows.index_add_(0, held.slot, to_w);
}

// A backward's common ending: U through eq. 4 into grad f (rows without gradient: zeros).
at::Tensor finish_features(const Setup& st, const at::Tensor& U, const at::Tensor& keep,
                           const at::Tensor& u_scale) {
  at::Tensor grad_f = at::empty({st.B, st.D}, st.f.options());
  FinishArgs a;
  a.x = st.f;
  a.inv_norm = st.inv_nf;
  a.u_scale = u_scale;
  a.keep = keep;
  a.out = grad_f;
  finish_rows(U, 0, at::Tensor(), a);
  return grad_f;
}

FinishArgs weight_finish(const Setup& st, at::Tensor& grad_w) {
  FinishArgs a;
  a.x = st.w;
  a.inv_norm = st.inv_nw;
  a.out = grad_w;
  return a;
}

// The dense backward loop (c_contrastive, c_triplet all): P per chunk, U += P W_c, grad W_c from
// V = P^T f, except the classes redirected into `held` (they have sparse terms still to come).
// Returns U; active_count (if defined) receives each row's active hinges.
at::Tensor dense_backward(const Setup& st, AgentTerms& t, at::Tensor& active_count,
                          at::Tensor& grad_w, Held* held, at::Tensor& u_scale) {
  // float16: P is scaled into float16's range; |P_ij| <= max(2|g_i|, |target_grad_i|) A_i B_j.
  if (st.f.scalar_type() == at::kHalf) {
    const at::Tensor row = t.slope.abs().maximum(t.target_grad.abs()) * st.inv_nf;
    std::tie(t.gc_scale, u_scale) = float16_grad_scale(
        at::kHalf, at::where(t.active, row, st.zero()).amax() * st.inv_nw.amax());
  }
  const at::Tensor f_op = gemm_features(st.f, t.active, st.op());
  ChunkWalk walk(f_op, st.w);
  at::Tensor U = at::zeros({walk.workers, st.B, st.D}, st.acc_opts());
  at::Tensor counts;
  if (active_count.defined()) counts = at::zeros({walk.workers, st.B}, st.acc_opts());
  FinishArgs to_w = weight_finish(st, grad_w);
  to_w.u_scale = u_scale;
  if (held != nullptr) {
    to_w.redirect = held->redirect;
    to_w.held = held->rows;
  }
  walk.run([&](int64_t worker_index, ChunkWorker& worker, int64_t j0, int64_t n) {
    const at::Tensor S = worker.logits(j0, n);
    at::Tensor P = worker.grad_operand(S);
    at::Tensor count = counts.defined() ? counts[worker_index] : at::Tensor();
    at::Tensor U_part = U[worker_index];
    NF_ON_DEVICE(S, agent_backward_chunk, S, P, j0, t, count);
    worker.add_grad_features(U_part, P);
    finish_rows(worker.grad_weight(P), j0, at::Tensor(), to_w);
  });
  if (counts.defined()) active_count.copy_(counts.sum(0));
  return U.sum(0);
}

// sum over the negatives of hinge(bound_i, d_ij), by a chunk loop.
at::Tensor hinge_sums(const Setup& st, const at::Tensor& bound) {
  const AgentTerms t = st.terms(bound);
  ChunkWalk walk(gemm_features(st.f, at::Tensor(), st.op()), st.w);
  at::Tensor sums = at::zeros({walk.workers, st.B}, st.acc_opts());
  walk.run([&](int64_t worker_index, ChunkWorker& worker, int64_t j0, int64_t n) {
    const at::Tensor S = worker.logits(j0, n);
    at::Tensor part = sums[worker_index];
    NF_ON_DEVICE(S, agent_forward_chunk, S, j0, t, part);
  });
  return sums.sum(0);
}

// The nearest wrong agent of each row by a chunk loop: (distance from the GEMM, local index).
// Workers hold increasing class ranges: merged in order, a later one wins only strictly
// (argmin_before: NaN first, then the smaller distance, then the smaller index).
std::tuple<at::Tensor, at::Tensor> hardest_negatives(const Setup& st, const at::Tensor& bound) {
  const AgentTerms t = st.terms(bound);
  ChunkWalk walk(gemm_features(st.f, at::Tensor(), st.op()), st.w);
  const int64_t T = walk.workers;
  at::Tensor best_d = at::full({T, st.B}, std::numeric_limits<double>::infinity(), st.acc_opts());
  at::Tensor best_k = at::full({T, st.B}, -1, st.targets.target.options());
  walk.run([&](int64_t worker_index, ChunkWorker& worker, int64_t j0, int64_t n) {
    const at::Tensor S = worker.logits(j0, n);
    at::Tensor d = best_d[worker_index], k = best_k[worker_index];
    NF_ON_DEVICE(S, argmin_chunk, S, j0, t, d, k);
  });
  at::Tensor d = best_d[0], k = best_k[0];
  for (int64_t w = 1; w < T; ++w) {
    const at::Tensor dw = best_d[w], kw = best_k[w];
    const at::Tensor take = kw.ge(0).logical_and(
        k.lt(0).logical_or(dw.isnan().logical_and(d.isnan().logical_not())).logical_or(dw.lt(d)));
    d = at::where(take, dw, d);
    k = at::where(take, kw, k);
  }
  return {d, k};
}

at::Tensor empty_losses(const at::Tensor& features) {
  return at::empty({features.size(0)}, features.options().dtype(acc_dtype(features.scalar_type())));
}

}  // namespace

// ------------------------------------------------------------------------ c_contrastive (eq. 10)

at::Tensor c_contrastive(const at::Tensor& features, const at::Tensor& weight,
                         const at::Tensor& labels, double pos_margin, double neg_margin,
                         int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  check_contrastive_args(features, weight, labels, pos_margin, neg_margin, ignore_index,
                         class_start, num_classes);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (features.size(0) == 0) return empty_losses(features);
  const Setup st(features, weight, labels, ignore_index, class_start);
  const at::Tensor negatives = hinge_sums(st, at::full({st.B}, neg_margin, st.acc_opts()));
  const at::Tensor target = at::where(st.targets.has, at::relu(st.d_y - pos_margin), st.zero());
  return at::where(st.targets.valid, target + negatives, st.zero());
}

// Gc_ij = 2 g [neg_margin - d_ij > 0] (j != y), Gc_iy = -2 g [d_iy - pos_margin > 0].
std::tuple<at::Tensor, at::Tensor> c_contrastive_backward(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, double pos_margin, double neg_margin, int64_t ignore_index,
    int64_t class_start, int64_t num_classes, bool check_data) {
  check_contrastive_args(features, weight, labels, pos_margin, neg_margin, ignore_index,
                         class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Setup st(features, weight, labels, ignore_index, class_start);
  at::Tensor grad_w = at::empty({st.C, st.D}, st.w.options());
  const at::Tensor g = upstream(grad_loss, st.targets.valid, st);
  if (st.B == 0) return {at::empty({0, st.D}, st.f.options()), grad_w.zero_()};
  AgentTerms t = st.terms(at::full({st.B}, neg_margin, st.acc_opts()));
  t.slope = 2.0 * g;
  t.active = g.ne(0);
  t.target_grad =
      at::where(st.targets.has.logical_and((st.d_y - pos_margin).gt(0)), -2.0 * g, st.zero());
  at::Tensor no_count, u_scale;
  const at::Tensor U = dense_backward(st, t, no_count, grad_w, nullptr, u_scale);
  return {finish_features(st, U, t.active, u_scale), grad_w};
}

// ------------------------------------------------------------------------ c_triplet (eq. 11)

std::tuple<at::Tensor, at::Tensor> c_triplet_forward(const at::Tensor& features,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& labels, double margin,
                                                     bool hardest_only, bool center,
                                                     int64_t ignore_index, int64_t class_start,
                                                     int64_t num_classes) {
  check_triplet_args(features, weight, labels, margin, ignore_index, class_start, num_classes);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto long_opts = labels.options().dtype(at::kLong);
  if (features.size(0) == 0) return {empty_losses(features), at::empty({0}, long_opts)};
  const Setup st(features, weight, labels, ignore_index, class_start);
  const at::Tensor bound = st.d_y + margin;  // margin + d_iy, the same op in the backward
  at::Tensor loss, hardest;
  if (hardest_only) {
    // Running argmin over the chunks (first index on ties, NaN wins), then d_ik* from a direct
    // dot, as the backward computes it.
    const at::Tensor best_k = std::get<1>(hardest_negatives(st, bound));
    hardest = at::where(st.targets.valid, best_k, at::scalar_tensor(-1, long_opts));
    // No negative (C = 1): d = +inf, the hinge relu(-inf) = 0.
    const at::Tensor d_k =
        at::where(best_k.ge(0), st.distances(best_k),
                  at::full({}, std::numeric_limits<double>::infinity(), st.acc_opts()));
    loss = at::relu(bound - d_k);
  } else {
    hardest = at::full({st.B}, -1, long_opts);
    loss = hinge_sums(st, bound);
  }
  if (center) loss = loss + st.d_y;
  return {at::where(st.targets.has, loss, st.zero()), hardest};
}

std::tuple<at::Tensor, at::Tensor> c_triplet_backward(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& hardest, double margin, bool hardest_only,
    bool center, int64_t ignore_index, int64_t class_start, int64_t num_classes, bool check_data) {
  check_triplet_backward_args(grad_loss, features, weight, labels, hardest, margin, hardest_only,
                              ignore_index, class_start, num_classes, check_data);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Setup st(features, weight, labels, ignore_index, class_start,
                 hardest_only ? AgentNorms::kTargetsAndHardest : AgentNorms::kAll, hardest);
  // Only rows with a local target carry a loss, and so a gradient.
  const at::Tensor g = upstream(grad_loss, st.targets.has, st);
  const at::Tensor bound = st.d_y + margin;
  const at::Tensor rows = at::arange(st.B, hardest.options());
  if (!hardest_only) {
    // Gc_ik = 2 g [margin + d_iy - d_ik > 0]; Gc_iy = -2 g (#active + center) after the loop.
    at::Tensor grad_w = at::empty({st.C, st.D}, st.w.options());
    if (st.B == 0) return {at::empty({0, st.D}, st.f.options()), grad_w.zero_()};
    AgentTerms t = st.terms(bound);
    t.slope = 2.0 * g;
    t.active = g.ne(0);
    t.target_grad = at::zeros({st.B}, st.acc_opts());
    Held held(st.targets.target, st);
    at::Tensor count = at::zeros({st.B}, st.acc_opts()), u_scale;
    at::Tensor U = dense_backward(st, t, count, grad_w, &held, u_scale);
    const at::Tensor coef = -2.0 * g * (count + (center ? 1.0 : 0.0));
    add_sparse(st, rows, held, at::where(t.active, coef, st.zero()), t.gc_scale, U);
    finish_rows(held.rows, 0, held.finish, weight_finish(st, grad_w));
    return {finish_features(st, U, t.active, u_scale), grad_w};
  }
  // hardest_only: the pairs (i, y_i) and (i, k*_i); an out-of-range k* reads as "none".
  at::Tensor grad_w = at::zeros({st.C, st.D}, st.w.options());
  if (st.B == 0) return {at::empty({0, st.D}, st.f.options()), grad_w};
  const at::Tensor minus_one = at::scalar_tensor(-1, hardest.options());
  at::Tensor k = hardest_in_range(hardest, st.C);
  const at::Tensor on =
      st.targets.has.logical_and(k.ge(0)).logical_and((bound - st.distances(k)).gt(0));
  k = at::where(on, k, minus_one);
  const at::Tensor coef_y = -2.0 * g * (on.to(g.scalar_type()) + (center ? 1.0 : 0.0));
  const at::Tensor coef_k = at::where(on, 2.0 * g, st.zero());
  const Held held(at::cat({st.targets.target, k}), st);
  at::Tensor U = at::zeros({st.B, st.D}, st.acc_opts());
  add_sparse(st, at::cat({rows, rows}), held, at::cat({coef_y, coef_k}), at::Tensor(), U);
  finish_rows(held.rows, 0, held.finish, weight_finish(st, grad_w));
  return {finish_features(st, U, g.ne(0), at::Tensor()), grad_w};
}

// ------------------------------------------------------------------------ center loss

at::Tensor center_loss(const at::Tensor& features, const at::Tensor& weight,
                       const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                       int64_t num_classes) {
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (features.size(0) == 0) return empty_losses(features);
  const Setup st(features, weight, labels, ignore_index, class_start, AgentNorms::kTargets);
  return at::where(st.targets.has, st.d_y, st.zero());
}

// Gc_iy = -2 g: one row of W per sample.
std::tuple<at::Tensor, at::Tensor> center_loss_backward(const at::Tensor& grad_loss,
                                                        const at::Tensor& features,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& labels,
                                                        int64_t ignore_index, int64_t class_start,
                                                        int64_t num_classes, bool check_data) {
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  check_float64_on_cpu(features);
  const c10::DeviceGuard guard(features.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Setup st(features, weight, labels, ignore_index, class_start, AgentNorms::kTargets);
  const at::Tensor g = upstream(grad_loss, st.targets.has, st);
  at::Tensor grad_w = at::zeros({st.C, st.D}, st.w.options());
  if (st.B == 0) return {at::empty({0, st.D}, st.f.options()), grad_w};
  const Held held(st.targets.target, st);
  at::Tensor U = at::zeros({st.B, st.D}, st.acc_opts());
  add_sparse(st, at::arange(st.B, held.key.options()), held, -2.0 * g, at::Tensor(), U);
  finish_rows(held.rows, 0, held.finish, weight_finish(st, grad_w));
  return {finish_features(st, U, g.ne(0), at::Tensor()), grad_w};
}

}  // namespace chunked
}  // namespace normface

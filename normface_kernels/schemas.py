"""Every op schema of normface_kernels, in one table (their math: docs/contract.md, derivations:
docs/kernels.md).

`CPP` is what csrc/registration.cpp declares (the C++ ops; a test asserts each entry equals the
registered schema). The Triton backend defines its ops `triton_<name>` from `TRITON`: the C++
schema for each op it also implements (`TRITON_TWINS`), and its own training ops, which return
the statistics their closed-form backward reads (normface_kernels/triton/registration.py).

This module imports nothing from the package.
"""

import inspect
from typing import Tuple

import torch

_SHARD = "int ignore_index, int class_start, int num_classes"
_MARGINS = ("float m1, float m2, float m3, float lam, bool normalize_features, "
            "bool normalize_weight")
_SOFTMAX_INPUTS = "Tensor features, Tensor weight, Tensor labels, Tensor scale"
_SOFTMAX_ARGS = f"{_SOFTMAX_INPUTS}, {_MARGINS}"
_AGENT_ARGS = "Tensor features, Tensor weight, Tensor labels"

CPP = {
    "set_data_checks": "(bool enabled) -> bool",
    "set_cpu_path": "(str path) -> str",
    "set_chunk_budget": "(int bytes) -> int",
    # Paper eq. 3 and its backward, eq. 4.
    "l2_normalize": "(Tensor x, float eps=1e-12) -> Tensor",
    "l2_normalize_backward": "(Tensor grad, Tensor x, float eps) -> Tensor",
    "cosine_logits": "(Tensor features, Tensor weight, Tensor scale, float eps=1e-12) -> Tensor",
    # The public composites (what normface_kernels.functional computes per sample).
    "cosine_softmax": (
        "(Tensor features, Tensor weight, Tensor labels, Tensor scale, float m1=1.0, "
        "float m2=0.0, float m3=0.0, float lam=0.0, bool normalize_features=True, "
        "bool normalize_weight=True, int ignore_index=-100) -> Tensor"),
    "c_triplet": (
        "(Tensor features, Tensor weight, Tensor labels, float margin=0.8, "
        "bool hardest_only=True, bool center=False, int ignore_index=-100) -> Tensor"),
    # The loss ops autograd runs: forward, and a backward taking the upstream gradients, the
    # inputs, the saved outputs and the parameters.
    "cosine_softmax_forward": f"({_SOFTMAX_ARGS}, {_SHARD}) -> (Tensor loss, Tensor lse)",
    "cosine_softmax_backward": (
        f"(Tensor grad_loss, Tensor grad_lse, {_SOFTMAX_INPUTS}, "
        f"Tensor lse, {_MARGINS}, {_SHARD}, bool check_data=True) "
        "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_scale)"),
    "c_contrastive": (
        f"({_AGENT_ARGS}, float pos_margin=0.0, float neg_margin=1.0, int ignore_index=-100, "
        "int class_start=0, int num_classes=-1) -> Tensor"),
    "c_contrastive_backward": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, float pos_margin, float neg_margin, {_SHARD}, "
        "bool check_data=True) -> (Tensor grad_features, Tensor grad_weight)"),
    "c_triplet_forward": (
        f"({_AGENT_ARGS}, float margin, bool hardest_only, bool center, {_SHARD}) "
        "-> (Tensor loss, Tensor hardest)"),
    "c_triplet_backward": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, Tensor hardest, float margin, bool hardest_only, "
        f"bool center, {_SHARD}, bool check_data=True) "
        "-> (Tensor grad_features, Tensor grad_weight)"),
    "center_loss": (
        f"({_AGENT_ARGS}, int ignore_index=-100, int class_start=0, int num_classes=-1) "
        "-> Tensor"),
    "center_loss_backward": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, {_SHARD}, bool check_data=True) "
        "-> (Tensor grad_features, Tensor grad_weight)"),
}

# The C++ ops the Triton backend implements too, as triton_<name> with the same schema.
TRITON_TWINS = (
    "l2_normalize", "l2_normalize_backward", "cosine_logits", "cosine_softmax_forward",
    "cosine_softmax_backward", "c_contrastive", "c_contrastive_backward", "c_triplet_forward",
    "c_triplet_backward", "center_loss", "center_loss_backward")

# The Triton training ops: `<loss>_train(..., need_grad)` returns the loss and what the
# closed-form backward reads (statistics (k, B), the (B, D) accumulator U or V -- (0, D) when
# need_grad is False --, the class norms (C,)); `<loss>_backward_saved` takes them back.
_SAVED_SOFTMAX = "Tensor lse, Tensor stats, Tensor ubar, Tensor nw"
_SAVED_AGENT = "Tensor stats, Tensor v, Tensor nw"
TRITON = {**{name: CPP[name] for name in TRITON_TWINS}, **{
    "cosine_logits_backward": (
        "(Tensor grad, Tensor features, Tensor weight, Tensor scale, float eps) "
        "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_scale)"),
    "cosine_softmax_train": (
        f"({_SOFTMAX_ARGS}, {_SHARD}, bool need_grad) "
        "-> (Tensor loss, Tensor lse, Tensor stats, Tensor ubar, Tensor nw)"),
    "cosine_softmax_backward_saved": (
        f"(Tensor grad_loss, Tensor grad_lse, {_SOFTMAX_INPUTS}, "
        f"{_SAVED_SOFTMAX}, {_MARGINS}, {_SHARD}) "
        "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_scale)"),
    "c_contrastive_train": (
        f"({_AGENT_ARGS}, float pos_margin, float neg_margin, {_SHARD}, bool need_grad) "
        "-> (Tensor loss, Tensor stats, Tensor v, Tensor nw)"),
    "c_contrastive_backward_saved": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, {_SAVED_AGENT}, float pos_margin, "
        f"float neg_margin, {_SHARD}) -> (Tensor grad_features, Tensor grad_weight)"),
    "c_triplet_train": (
        f"({_AGENT_ARGS}, float margin, bool hardest_only, bool center, {_SHARD}, "
        "bool need_grad) -> (Tensor loss, Tensor hardest, Tensor stats, Tensor v, Tensor nw)"),
    "c_triplet_backward_saved": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, Tensor hardest, {_SAVED_AGENT}, float margin, "
        f"bool hardest_only, bool center, {_SHARD}) "
        "-> (Tensor grad_features, Tensor grad_weight)"),
    "center_loss_backward_saved": (
        f"(Tensor grad_loss, {_AGENT_ARGS}, {_SHARD}) "
        "-> (Tensor grad_features, Tensor grad_weight)"),
}}


def parse(name, schema):
    """The torch FunctionSchema of normface::<name><schema>."""
    return torch._C.parse_schema(f"normface::{name}{schema}")


_PY_TYPES = {"Tensor": torch.Tensor, "float": float, "int": int, "bool": bool, "str": str}


def signature(name, schema, fn):
    """The Python signature of `schema` for the op body `fn`, whose parameter names must be the
    schema's (a drift fails at import): torch.library infers an op's schema from its function's
    signature (triton_op cannot take an explicit one on torch 2.11), so the body gets this
    signature as __signature__. The returns lose their names (inference cannot name them)."""
    parsed = parse(name, schema)
    names = [a.name for a in parsed.arguments]
    own = list(inspect.signature(fn).parameters)
    if own != names:
        raise TypeError(f"the body of {name} takes {own}, its schema {names}")
    params = [inspect.Parameter(
        a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_PY_TYPES[str(a.type)],
        default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
        for a in parsed.arguments]
    returns = [_PY_TYPES[str(r.type)] for r in parsed.returns]
    annotation = returns[0] if len(returns) == 1 else Tuple[tuple(returns)]
    return inspect.Signature(params, return_annotation=annotation)

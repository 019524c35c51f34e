"""The bad-input table of the contract ("Bad input"): every op of torch.ops.normface (the C++ ops,
the triton_* ops), every public function on every backend, and NormFaceLoss, each fed one bad
argument. Every case must raise ValueError (whatever the backend) whose message names the argument.

test_bad_input.py runs the table in a worker process (`python bad_input_cases.py` reads case
names on stdin and answers one JSON line per case), so that a crash -- a kernel reading memory
it was never given -- fails its case instead of taking pytest down, and a hang times out.
The worker runs the Triton ops in the interpreter, on CPU tensors (no GPU needed).

A case is `name -> (word, thunk)`: `word` must appear in the message, `thunk()` makes the call.
Names read `<target>/<argument>=<what>`, e.g. `op:c_contrastive/weight=meta`.
"""

import json
import math
import os
import sys

B, C, D = 4, 6, 5

# Schemas of the ops (csrc/registration.cpp; the triton_* ops share them), as the valid keyword
# arguments of one call. Tensors are named here and built by _base().
_SOFTMAX = dict(features="f", weight="w", labels="y", scale="s", m1=1.0, m2=0.0, m3=0.0,
                lam=0.0, normalize_features=True, normalize_weight=True, ignore_index=-100)
_SHARD = dict(class_start=0, num_classes=-1)
CPP_OPS = {
    "l2_normalize": dict(x="f", eps=1e-12),
    "l2_normalize_backward": dict(grad="f", x="f", eps=1e-12),
    "cosine_logits": dict(features="f", weight="w", scale="s", eps=1e-12),
    "cosine_softmax": _SOFTMAX,
    "cosine_softmax_forward": {**_SOFTMAX, **_SHARD},
    "cosine_softmax_backward": dict(grad_loss="g", grad_lse="g", **{
        k: v for k, v in _SOFTMAX.items() if k in ("features", "weight", "labels", "scale")},
        lse="g", **{k: v for k, v in _SOFTMAX.items()
                    if k not in ("features", "weight", "labels", "scale")}, **_SHARD),
    "c_contrastive": dict(features="f", weight="w", labels="y", pos_margin=0.0, neg_margin=1.0,
                          ignore_index=-100, **_SHARD),
    "c_contrastive_backward": dict(grad_loss="g", features="f", weight="w", labels="y",
                                   pos_margin=0.0, neg_margin=1.0, ignore_index=-100, **_SHARD),
    "c_triplet": dict(features="f", weight="w", labels="y", margin=0.8, hardest_only=True,
                      center=False, ignore_index=-100),
    "c_triplet_forward": dict(features="f", weight="w", labels="y", margin=0.8,
                              hardest_only=True, center=False, ignore_index=-100, **_SHARD),
    "c_triplet_backward": dict(grad_loss="g", features="f", weight="w", labels="y", hardest="h",
                               margin=0.8, hardest_only=True, center=False, ignore_index=-100,
                               **_SHARD),
    "center_loss": dict(features="f", weight="w", labels="y", ignore_index=-100, **_SHARD),
    "center_loss_backward": dict(grad_loss="g", features="f", weight="w", labels="y",
                                 ignore_index=-100, **_SHARD),
}
# The settings ops (no tensors; csrc/registration.cpp, csrc/chunked): argument -> bad values.
SETTINGS_OPS = {
    "set_data_checks": dict(enabled=[("string", "yes")]),
    "set_cpu_path": dict(path=[("unknown", "sideways")]),
    "set_chunk_budget": dict(bytes=[("negative", -1)]),
}
# The Triton ops: the same schemas (no composites), plus the backward of cosine_logits.
TRITON_OPS = {
    "triton_" + name: args for name, args in CPP_OPS.items()
    if name not in ("cosine_softmax", "c_triplet")}
TRITON_OPS["triton_cosine_logits_backward"] = dict(grad="gl", features="f", weight="w",
                                                   scale="s", eps=1e-12)

BACKENDS = ("cpu", "reference", "triton")
PUBLIC = {
    "cosine_softmax": dict(features="f", weight="w", labels="y", scale=10.0, m1=1.0, m2=0.0,
                           m3=0.0, lam=0.0, ignore_index=-100, reduction="mean"),
    "c_contrastive": dict(features="f", weight="w", labels="y", pos_margin=0.0, neg_margin=1.0,
                          ignore_index=-100, reduction="mean"),
    "c_triplet": dict(features="f", weight="w", labels="y", margin=0.8, ignore_index=-100,
                      reduction="mean"),
    "center_loss": dict(features="f", weight="w", labels="y", ignore_index=-100,
                        reduction="mean"),
    "cosine_logits": dict(features="f", weight="w", scale=1.0),
    "l2_normalize": dict(x="f", eps=1e-12),
}

NAN, INF = math.nan, math.inf


def _base():
    import torch
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g)
    return dict(f=f, w=w, y=torch.arange(B), s=torch.tensor(10.0), g=torch.ones(B),
                gl=torch.ones(B, C), h=torch.tensor([1, 0, 0, 0]))


def _bad_values(t):
    """Argument name -> [(what, value factory, word or None for the argument's own name)]."""
    import torch
    meta = lambda x: x.to("meta")  # noqa: E731
    tensor_scale = [
        ("nan", lambda: torch.tensor(NAN), None), ("inf", lambda: torch.tensor(INF), None),
        ("-inf", lambda: torch.tensor(-INF), None), ("zero", lambda: torch.tensor(0.0), None),
        ("negative", lambda: torch.tensor(-1.0), None),
        ("complex", lambda: torch.tensor(1.0 + 1j), None),
        ("int", lambda: torch.tensor(3), None), ("shape_C", lambda: torch.ones(C), None),
        ("meta", lambda: meta(t["s"]), None), ("none", lambda: None, None)]
    per_sample = [("meta", lambda: meta(t["g"]), None),
                  ("shape_B+1", lambda: torch.ones(B + 1), None),
                  ("rank2", lambda: torch.ones(B, 1), None),
                  ("int", lambda: torch.ones(B, dtype=torch.int64), None)]
    hinge = [("nan", lambda: NAN, None), ("inf", lambda: INF, None), ("-inf", lambda: -INF, None)]
    return {
        "features": [
            ("rank1", lambda: t["f"][0], None), ("rank3", lambda: t["f"][None], None),
            ("int", lambda: t["f"].long(), None),
            ("complex", lambda: t["f"].to(torch.complex64), None),
            ("meta", lambda: meta(t["f"]), "device"),
            ("D_mismatch", lambda: t["f"][:, :4], "same D"),
            ("B_mismatch", lambda: t["f"][:3], "labels")],
        "weight": [
            ("rank1", lambda: t["w"][0], None), ("rank3", lambda: t["w"][None], None),
            ("D_mismatch", lambda: t["w"][:, :4], None), ("no_classes", lambda: t["w"][:0], None),
            ("float64", lambda: t["w"].double(), None), ("meta", lambda: meta(t["w"]), None),
            ("list", lambda: t["w"].tolist(), None)],
        "labels": [
            ("rank2", lambda: t["y"][:, None], None), ("B_mismatch", lambda: t["y"][:3], None),
            ("float", lambda: t["y"].float(), None), ("bool", lambda: t["y"] > 1, None),
            ("int32", lambda: t["y"].int(), None),
            ("too_large", lambda: torch.tensor([0, 1, C, 2]), None),
            ("negative", lambda: torch.tensor([0, -1, 3, 2]), None),
            ("huge", lambda: torch.tensor([0, 2 ** 62, 1, 2]), None),
            ("meta", lambda: meta(t["y"]), None), ("none", lambda: None, None)],
        "scale": tensor_scale,
        "m1": [("zero", lambda: 0.0, None), ("negative", lambda: -1.0, None),
               ("half", lambda: 0.5, None), ("nan", lambda: NAN, None), ("inf", lambda: INF, None)],
        "m2": [("nan", lambda: NAN, None), ("inf", lambda: INF, None),
               ("-inf", lambda: -INF, None)],
        "m3": [("nan", lambda: NAN, None), ("inf", lambda: INF, None)],
        "lam": [("negative", lambda: -1.0, None), ("nan", lambda: NAN, None),
                ("inf", lambda: INF, None)],
        "pos_margin": hinge, "neg_margin": hinge, "margin": hinge,
        "eps": [("negative", lambda: -1.0, None), ("nan", lambda: NAN, None),
                ("inf", lambda: INF, None)],
        "ignore_index": [("float", lambda: 1.5, None), ("2**70", lambda: 2 ** 70, None),
                         ("str", lambda: "a", None), ("none", lambda: None, None)],
        "class_start": [("negative", lambda: -1, None), ("past_the_end", lambda: 1, None),
                        ("int64_max", lambda: 2 ** 63 - 1, None), ("2**70", lambda: 2 ** 70, None)],
        "num_classes": [("below_-1", lambda: -2, None), ("below_C", lambda: C - 1, None),
                        ("2**70", lambda: 2 ** 70, None)],
        "grad_loss": per_sample, "grad_lse": per_sample, "lse": per_sample,
        "hardest": [("meta", lambda: meta(t["h"]), None),
                    ("shape_B+1", lambda: torch.zeros(B + 1, dtype=torch.int64), None),
                    ("int32", lambda: t["h"].int(), None),
                    ("too_large", lambda: torch.tensor([C, 0, 0, 0]), None),
                    ("below_-1", lambda: torch.tensor([-2, 0, 0, 0]), None)],
        "grad": [("shape", lambda: t["f"][:3], None), ("meta", lambda: meta(t["f"]), None),
                 ("int", lambda: t["f"].long(), None)],
        "x": [("int", lambda: t["f"].long(), None), ("zero_dim", lambda: torch.tensor(1.0), None),
              ("list", lambda: [1.0, 2.0], None)],
    }


def _public_bad_values(t):
    """Public functions take Python numbers for scale and validate what the ops cannot see."""
    import torch
    values = _bad_values(t)
    values["scale"] = values["scale"] + [
        ("float_nan", lambda: NAN, None), ("float_inf", lambda: INF, None),
        ("float_zero", lambda: 0.0, None), ("float_negative", lambda: -5.0, None),
        ("str", lambda: "a", None), ("bool", lambda: True, None)]
    values["labels"] = [v for v in values["labels"] if v[0] != "int32"]  # int32 is converted
    values["ignore_index"] = values["ignore_index"] + [("bool", lambda: True, None),
                                                       ("tensor", lambda: torch.tensor(1.5), None)]
    for name in ("m1", "m2", "m3", "lam", "pos_margin", "neg_margin", "margin", "eps"):
        values[name] = values[name] + [("str", lambda: "a", None), ("none", lambda: None, None)]
    values["reduction"] = [("unknown", lambda: "avg", None), ("none_object", lambda: None, None)]
    values["backend"] = [("unknown", lambda: "tpu", None)]
    return values


def _resolve(args, t):
    return {k: (t[v] if isinstance(v, str) and v in t else v) for k, v in args.items()}


def _call_op(name, kwargs):
    import torch
    return lambda: getattr(torch.ops.normface, name)(**kwargs)


def _call_public(name, kwargs):
    import normface_kernels as nk
    return lambda: getattr(nk, name)(**kwargs)


def _module_cases():
    """NormFaceLoss: bad constructor arguments, and bad inputs to forward."""
    import torch

    import normface_kernels as nk
    t = _base()
    f, y = t["f"], t["y"]

    def build(**kw):
        return lambda: nk.NormFaceLoss(D, C, **kw)

    def run(inputs=(f, y), **kw):
        return lambda: nk.NormFaceLoss(D, C, **kw)(*inputs)

    return {
        "module/scale=negative": ("scale", build(scale=-5.0)),
        "module/scale=zero": ("scale", build(scale=0.0)),
        "module/scale=nan": ("scale", build(scale=NAN)),
        "module/scale=inf": ("scale", build(scale=INF)),
        "module/scale=str": ("scale", build(scale="fixed")),
        "module/loss=unknown": ("loss", build(loss="hinge")),
        "module/aux=unknown": ("aux", build(aux="triplet")),
        "module/reduction=unknown": ("reduction", build(reduction="avg")),
        "module/embedding_size=zero": ("embedding_size", lambda: nk.NormFaceLoss(0, C)),
        "module/margins=two": ("margins", build(margins=(1.0, 0.5))),
        "module/margins=m1_half": ("m1", run(margins=(0.5, 0.0, 0.0))),
        "module/margins=m2_nan": ("m2", run(margins=(1.0, NAN, 0.0))),
        "module/lam=negative": ("lam", run(lam=-1.0)),
        "module/pos_margin=nan": ("pos_margin", run(loss="c_contrastive", pos_margin=NAN)),
        "module/triplet_margin=inf": ("margin", run(loss="c_triplet", triplet_margin=INF)),
        "module/ignore_index=float": ("ignore_index", run(ignore_index=1.5)),
        "module/backend=unknown": ("backend", run(backend="tpu")),
        "module/forward_features=D_mismatch": ("same D", run(inputs=(f[:, :4], y))),
        "module/forward_features=meta": ("device", run(inputs=(f.to("meta"), y))),
        "module/forward_labels=none": ("labels", run(inputs=(f, None))),
        "module/forward_labels=too_large": ("labels", run(inputs=(f, torch.tensor([0, 1, C, 2])))),
        "module/forward_labels=float": ("labels", run(inputs=(f, y.float()))),
    }


def cases():
    """name -> (word, thunk). Builds tensors; calls nothing."""
    t = _base()
    values = _bad_values(t)
    table = {}
    for prefix_ops in (CPP_OPS, TRITON_OPS):
        for op, args in prefix_ops.items():
            base = _resolve(args, t)
            for arg in args:
                for what, make, word in values.get(arg, ()):
                    if what == "B_mismatch" and "labels" not in args:
                        continue
                    table[f"op:{op}/{arg}={what}"] = (word or arg,
                                                      _call_op(op, {**base, arg: make()}))
    for op, args in SETTINGS_OPS.items():
        for arg, bad in args.items():
            for what, value in bad:
                table[f"op:{op}/{arg}={what}"] = (arg, _call_op(op, {arg: value}))
    public_values = _public_bad_values(t)
    for fn, args in PUBLIC.items():
        for backend in BACKENDS:
            base = {**_resolve(args, t), "backend": backend}
            for arg in list(args) + ["backend"]:
                for what, make, word in public_values.get(arg, ()):
                    if what == "B_mismatch" and "labels" not in args:
                        continue
                    table[f"{fn}[{backend}]/{arg}={what}"] = (
                        word or arg, _call_public(fn, {**base, arg: make()}))
    table.update(_module_cases())
    return table


def _checks_off(thunk):
    """thunk with the data checks switched off: CPU tensors must be checked all the same."""
    import normface_kernels as nk

    def run():
        previous = nk.set_data_checks(False)
        try:
            return thunk()
        finally:
            nk.set_data_checks(previous)
    return run


DATA_CASES = ("labels=too_large", "labels=negative", "scale=nan", "scale=zero",
              "hardest=too_large")


def serve():
    """Worker loop: one case name per stdin line -> one JSON line on stdout."""
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import normface_kernels as nk
    triton_ok = nk.backends.REGISTRY["triton"].load()[0]  # defines the triton_* ops
    table = cases()
    for line in sys.stdin:
        name = line.strip()
        if name == "__abort__":  # lets the test of the harness see a crash
            os.abort()
        checks_off = name.endswith("[checks off]")
        base = name[: -len("[checks off]")].rstrip() if checks_off else name
        if base not in table:
            answer = {"status": "unknown"}
        elif ("triton" in base) and not triton_ok:
            answer = {"status": "skip", "message": "the Triton ops are not available"}
        else:
            word, thunk = table[base]
            try:
                result = (_checks_off(thunk) if checks_off else thunk)()
                answer = {"status": "returned", "message": repr(result)[:300]}
            except Exception as error:  # noqa: BLE001 - reported to the test
                answer = {"status": "raised", "type": type(error).__name__,
                          "message": str(error)[:2000]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()

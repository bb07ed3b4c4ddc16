"""What the passes know about aten ops: which are views, which backward consumers tolerate a
quantized saved tensor, which only compare it with a scalar.

Registries are dicts filled by ``_register``; registering an op twice raises.
"""

from __future__ import annotations

import operator

import torch

aten = torch.ops.aten
prims = torch.ops.prims

# role of a saved tensor in a backward consumer
VALUE = "value"  # used arithmetically: bounded unbiased noise is fine
COMPARE = "compare"  # compared with a scalar: a 1-bit mask of the result is exact
TRANSPARENT = "transparent"  # a view/copy: look at its users instead
EXACT = "exact"  # a known consumer that needs this argument exact (kept, no warning)

_ROLES: dict[object, str] = {}


def _register(role: str, *packets) -> None:
    for packet in packets:
        for name in packet.overloads():
            op = getattr(packet, name)
            if op in _ROLES:
                raise KeyError(f"fxlowbit: op {op} registered twice")
            _ROLES[op] = role


# View ops: following their first argument leads to the tensor a saved value aliases.
VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.alias.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.as_strided.default,
    aten.diagonal.default,
    aten.unfold.default,
}
# Same shape, same values: a comparison of the result equals the comparison of the input.
IDENTITIES = {aten.alias.default, aten.clone.default, aten.detach.default}
# Comparisons with a scalar: the backward's uses a 1-bit mask computed in the forward replaces.
COMPARISONS = {aten.le, aten.lt, aten.gt, aten.ge, aten.eq, aten.ne}
# Build a tensor from sizes and scalars only: free to replay in the backward (masks, positions).
CONSTRUCTORS = {
    aten.full.default,
    aten.zeros.default,
    aten.ones.default,
    aten.scalar_tensor.default,
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    prims.iota.default,
    aten.empty.memory_format,
}
# Not pointwise, but linear-time data movement with no reduction over a large dimension: cheap to
# replay (attention masks are built from positions with these).
CHEAP_MOVES = {
    aten.index.Tensor,
    aten.cumsum.default,
    aten.cat.default,
    aten.clone.default,
    aten.constant_pad_nd.default,
}

_register(
    TRANSPARENT,
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.unsqueeze,
    aten.squeeze,
    aten.alias,
    aten.expand,
    aten.slice,
    aten.select,
    aten.clone,
    aten.contiguous,
    prims.convert_element_type,
    aten._to_copy,
    aten.split,
    aten.split_with_sizes,
    aten.unbind,
    aten.cat,
    aten.constant_pad_nd,
    aten.repeat,
)
# Consumers whose result is a smooth (or linear) function of the saved tensor, so stochastic
# rounding noise of bounded range only adds bounded, zero-mean (to first order) error.
# Deliberately absent: log, reciprocal, rsqrt, sqrt and division *by* the tensor (a value rounded
# to 0 would create Inf), sign/sgn (a value near 0 could flip), comparisons between two tensors
# (exactness), sort/topk/max indices.
_register(
    VALUE,
    aten.mm,
    aten.bmm,
    aten.addmm,
    aten.baddbmm,
    aten.matmul,
    aten.linear,
    aten.mul,
    aten.add,
    aten.sub,
    aten.rsub,
    aten.neg,
    aten.sum,
    aten.mean,
    aten.exp,
    aten.tanh,
    aten.sigmoid,
    aten.erf,
    aten.sin,
    aten.cos,
    aten.pow,
    aten.where,
    aten.convolution,
    aten.convolution_backward,
    aten.native_layer_norm_backward,
    aten.native_batch_norm_backward,
    aten.native_group_norm_backward,
    aten._softmax_backward_data,
    aten._log_softmax_backward_data,
    aten.gelu_backward,
    aten.silu_backward,
    aten.sigmoid_backward,
    aten.tanh_backward,
    aten.avg_pool2d_backward,
    aten.max_pool2d_with_indices_backward,
    aten.addcmul,
    aten.square,
    aten.abs,
    aten.gelu,
    aten.silu,
    aten.relu,
    aten.var_mean,
    aten.var,
    aten.native_layer_norm,
    aten.native_batch_norm,
)
_register(COMPARE, aten.le, aten.lt, aten.gt, aten.ge, aten.eq, aten.ne)

# Division: fine when the saved tensor is the numerator (argument 0), not the denominator.
_register(VALUE, aten.div)


# Ops where only some arguments tolerate compression: op -> indices that are VALUE (others: exact).
# Fused attention backwards are smooth in query/key/value/out; the logsumexp must stay exact.
_ARG_VALUES: dict[object, frozenset[int]] = {}
for _name, _idx in (
    ("_scaled_dot_product_flash_attention_for_cpu_backward", (1, 2, 3, 4)),
    ("_scaled_dot_product_flash_attention_backward", (1, 2, 3, 4)),
    ("_scaled_dot_product_efficient_attention_backward", (1, 2, 3, 5)),
    ("_scaled_dot_product_cudnn_attention_backward", (1, 2, 3, 4)),
):
    if hasattr(aten, _name):
        _ARG_VALUES[getattr(aten, _name).default] = frozenset(_idx)


# Library custom ops (by qualified name: the library may not be imported), same meaning. MoE
# layers: grouped GEMMs over experts. Their backward multiplies the saved tokens and weights by
# the output gradient (two GEMMs per expert), so both tolerate bounded noise; the group offsets
# (integers) must stay exact.
_NAMED_ARG_VALUES: dict[str, frozenset[int]] = {
    "transformers::grouped_mm_fallback_backward": frozenset((0, 1, 3)),  # (input, weight, offs, grad)
    "aten::_grouped_mm": frozenset((0, 1)),  # (mat_a, mat_b, offs, bias, out_dtype): its backward
    # (grad, x, weight, seed, key, ...): x feeds the kept rows' GEMM and the sampling scores
    "fxlowbit::sampled_linear_keyed_backward": frozenset((0, 1)),
    # (grad, x, xq, xs, w, ...): x, saved as is, feeds only the grad-weight GEMM; the int8 codes
    # and scales of a low-bit forward's copy stay exact
    "fxlowbit::lowbit_linear_backward": frozenset((1,)),
}


# Outputs of tuple-returning ops that never read some of their arguments, by output index: a
# probe's replay (fxlowbit.calibrate) does not rerun what a rounded argument cannot reach.
_OUTPUT_IGNORES: dict[str, dict[int, frozenset[int]]] = {
    # (grad, x, xq, xs, w, ...) -> (dx, dw, db): dx multiplies the gradient by the weight only
    "fxlowbit::lowbit_linear_backward": {0: frozenset((1, 2, 3))},
    # (grad_output, input, weight, ...) -> (grad_input, grad_weight, grad_bias): grad_input is the
    # transposed convolution of the gradient by the weight
    "aten::convolution_backward": {0: frozenset((1,))},
}


def _qualified(target) -> str | None:
    """``namespace::name`` of an op overload or packet, None for anything else."""
    name = getattr(target, "name", None)
    return name() if callable(name) else None


def ignored_args(target, output: int) -> frozenset[int]:
    """Positional arguments of ``target`` its tuple output ``output`` never reads."""
    return _OUTPUT_IGNORES.get(_qualified(target) or "", {}).get(output, frozenset())


def role(target, arg_index: int, args) -> str | None:
    """Role of a saved tensor appearing as positional argument ``arg_index`` of ``target``;
    EXACT if the op is known to need it exact, None if the op is not known at all."""
    if target in _ARG_VALUES:
        return VALUE if arg_index in _ARG_VALUES[target] else EXACT
    named = _NAMED_ARG_VALUES.get(_qualified(target) or "")
    if named is not None:
        return VALUE if arg_index in named else EXACT
    if getattr(target, "namespace", None) == "fxlowbit":
        return EXACT  # our fused ops (linear_ce_bwd recomputes logits from h, w, lse) need them as saved
    if target is operator.getitem:
        return TRANSPARENT if arg_index == 0 else None  # a piece of a split (a view)
    r = _ROLES.get(target)
    if r is None:
        return None
    if target.overloadpacket is aten.div and arg_index != 0:
        return EXACT  # a denominator rounded to 0 would create Inf
    if r == COMPARE:
        # only comparisons with a Python scalar (or `.Scalar` overloads) are mask-exact
        other = args[1 - arg_index] if len(args) > 1 else None
        return COMPARE if isinstance(other, (int, float, bool)) else None
    if target is aten.where.self and arg_index == 0:
        return EXACT  # a float condition would be odd; be safe
    return r


def draws_random(node) -> bool:
    """Whether an FX call draws random numbers: an op tagged ``nondeterministic_seeded``, unless it
    takes a ``dropout_p`` that is 0 (the attention ops are tagged for their dropout)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    for i, arg in enumerate(target._schema.arguments):
        if arg.name == "dropout_p":
            p = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else arg.default_value)
            return not (isinstance(p, (int, float)) and p == 0)
    return True

"""What a backward rule sees: node emission, constants, static shapes, opset-aware helpers.

Helpers emit the operator form that matches the model's opset (axes as attribute
before opset 13, as input from 13 on, and so on), so rules never branch on it.
The batch dimension stays dynamic: anything that depends on it goes through
`Shape`, never through a number fixed at build time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import Unimplemented
from ..graph.loading import TensorInfo

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
# constants up to this many elements are shared between rules (scalars, small shapes)
_SHARED_CONST_MAX_SIZE = 64


def _fold_arithmetic(ufunc):
    def fold(node, args):
        a, b = args
        if a is None or b is None or a.dtype != b.dtype or (ufunc is np.divide and a.dtype.kind != "f"):
            return None
        return np.asarray(ufunc(a, b), dtype=a.dtype)
    return fold


def _fold_reshape(node, args):
    data, shape = args[0], args[1] if len(args) > 1 else None
    if data is None:
        return None
    if shape is None:  # opset < 5: shape attribute
        shape = next((np.array(a.ints) for a in node.attribute if a.name == "shape"), None)
        if shape is None:
            return None
    allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
    dims = [int(d) if (d != 0 or allow_zero) else data.shape[i] for i, d in enumerate(shape)]
    return data.reshape(dims)


def _fold_unsqueeze(node, args):
    data = args[0]
    axes = args[1] if len(args) > 1 else next((np.array(a.ints) for a in node.attribute if a.name == "axes"), None)
    if data is None or axes is None:
        return None
    rank = data.ndim + len(axes)
    for axis in sorted(int(a) % rank for a in axes):
        data = np.expand_dims(data, axis)
    return data


# ops folded_value evaluates in numpy: what a BatchNorm factor and a weight scaled by it are made of
_FOLDABLE_OPS = {
    "Mul": _fold_arithmetic(np.multiply), "Div": _fold_arithmetic(np.divide),
    "Add": _fold_arithmetic(np.add), "Sub": _fold_arithmetic(np.subtract),
    "Sqrt": lambda node, args: None if args[0] is None or args[0].dtype.kind != "f" else np.sqrt(args[0]),
    "Reshape": _fold_reshape, "Unsqueeze": _fold_unsqueeze,
    "Identity": lambda node, args: args[0],
}


class RuleContext:
    def __init__(self, *, infos: dict[str, TensorInfo], opset: int,
                 constants: dict[str, np.ndarray], static: set[str], taken_names: set[str],
                 needs_grad: Callable[[onnx.NodeProto, int], bool],
                 forward_producers: dict[str, onnx.NodeProto] | None = None,
                 sole_route: Callable[[str, onnx.NodeProto], onnx.NodeProto | None] = lambda name, node: None,
                 rule_of: Callable[[onnx.NodeProto], Callable | None] = lambda node: None,
                 data: set[str] | frozenset[str] = frozenset()):
        self.opset = opset
        self._data = data   # the graph's inputs and their reshapes (see is_data)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._infos = infos
        self._constants = constants
        self._static = static
        self._forward_producers = forward_producers or {}
        self._folded: dict[str, np.ndarray | None] = {}  # see folded_value
        # gradient tensor -> (unscaled gradient, per-channel factor [C]) for the fold in `scale_channels`
        self._channel_scales: dict[str, tuple[str, str]] = {}
        self._taken = taken_names
        self._needs_grad = needs_grad
        self._sole_route = sole_route
        self._rule_of = rule_of
        # gradient tensor -> forward node whose value mask it already carries (see `premasked`)
        self._premasked: dict[str, onnx.NodeProto] = {}
        self._batch_sums: dict[str, Callable[[], str]] = {}
        self._counter = 0
        self._shared_consts: dict[tuple, str] = {}
        self._shape_tensors: dict[str, str] = {}
        self._producers: dict[str, onnx.NodeProto] = {}  # emitted tensor -> the node that makes it
        self._weight_shapes: dict[str, tuple[int, ...]] = {}  # shapes of the initializers `const` made
        self.node_label = "grad"   # prefix of emitted node names: the primal node being differentiated

    # ---- naming and emission -------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        """A tensor/node name not used anywhere in the graph."""
        while True:
            self._counter += 1
            name = f"{self.node_label}/{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def make_node(self, op_type: str, inputs: Sequence[str], num_outputs: int = 1, **attrs):
        """Emit one node; returns its output name (or list of names if num_outputs != 1)."""
        outputs = [self.fresh(op_type) for _ in range(num_outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type + "_node"), **attrs)
        self.nodes.append(node)
        for out in outputs:
            self._producers[out] = node
        return outputs[0] if num_outputs == 1 else outputs

    def const(self, array, hint: str = "const") -> str:
        """Initializer holding `array` (small ones shared)."""
        array = np.asarray(array)
        key = None
        if array.size <= _SHARED_CONST_MAX_SIZE:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._shared_consts:
                return self._shared_consts[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        self._weight_shapes[name] = array.shape
        self._folded[name] = array
        if key is not None:
            self._shared_consts[key] = name
        return name

    def scalar(self, value: float, like: str) -> str:
        """0-d constant with the element type of tensor `like`."""
        return self.const(np.array(value, dtype=self.dtype(like)), "scalar")

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), dtype=np.int64), "ints")

    # ---- static information about forward tensors -------------------------------------------
    def info(self, name: str) -> TensorInfo:
        found = self._infos.get(name)
        if found is None:
            raise Unimplemented(f"tensor {name!r} has no inferred type/shape; cannot build its gradient")
        return found

    def shape(self, name: str) -> tuple:
        """Static shape: ints, the batch symbol 'N' (or other dim_params) or None per dim."""
        shape = self.info(name).shape
        if shape is None:
            raise Unimplemented(f"tensor {name!r} has unknown rank; cannot build its gradient")
        return shape

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def static_dims(self, name: str, axes: Sequence[int], why: str) -> list[int]:
        """Sizes of `axes` of `name`, which must be known numbers at build time."""
        shape = self.shape(name)
        dims = [shape[a] for a in axes]
        if not all(isinstance(d, int) for d in dims):
            # the node being differentiated, as UNIMPLEMENTED names it elsewhere (its label while its rule runs)
            node = f" (node {self.node_label[len('grad/'):]!r})" if self.node_label.startswith("grad/") else ""
            raise Unimplemented(f"{why}{node} needs static sizes of axes {list(axes)} of tensor {name!r}, got shape "
                                f"{shape}")
        return dims

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).dtype

    def elem_type(self, name: str) -> int:
        return self.info(name).elem_type

    def constant_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output of the model, None if computed (see folded_value)."""
        return self._constants.get(name)

    def folded_value(self, name: str) -> np.ndarray | None:
        """Value of `name` where it is known at build time, None where it is computed at run time:
        a constant of the model or made by a rule, or what a few folding-friendly ops (arithmetic,
        Sqrt, Reshape, Unsqueeze, Identity) compute from those, in the model or in emitted nodes.

        For rules that must rearrange a weight's numbers, e.g. a strided Conv's polyphase adjoint
        of a weight scaled by a BatchNorm factor the model did not fold (light_densenet121's and
        light_resnet50's 7x7/2 stems: ~20 ms of ConvTranspose at batch 8 otherwise). numpy repeats
        onnxruntime's float arithmetic op for op, so the values are the ones onnxruntime's constant
        folding would give. Not used where emitted nodes will do: onnxruntime folds those at session
        creation, which costs less than numpy plus serializing the result (ResNet-50: ~0.2 s).
        """
        if name in self._constants:
            return self._constants[name]
        if name not in self._folded:
            self._folded[name] = self._fold(name)
        return self._folded[name]

    def _fold(self, name: str) -> np.ndarray | None:
        # emitted nodes, or forward nodes computing weights (forward_producers holds static tensors only)
        node = self._producers.get(name) or self._forward_producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE_OPS:
            return None
        args = [self.folded_value(i) if i else None for i in node.input]
        try:
            return _FOLDABLE_OPS[node.op_type](node, args)
        except (TypeError, ValueError):  # missing operand, unexpected attribute or shape
            return None

    def is_data(self, name: str) -> bool:
        """Whether `name` is a graph input (the images) or a reshape of one, not a computed activation."""
        return name in self._data

    def is_static(self, name: str) -> bool:
        """True if the forward tensor depends on no graph input (weights and what is computed from them)."""
        return name in self._static

    def needs_grad(self, node: onnx.NodeProto, input_index: int) -> bool:
        """True if the gradient for this input is used (it lies on a wrt -> objective path)."""
        return input_index < len(node.input) and bool(node.input[input_index]) and self._needs_grad(node, input_index)

    def sole_gradient_source(self, x: str, consumer: onnx.NodeProto) -> onnx.NodeProto | None:
        """The forward node that produces `x`, if `consumer` is the only node whose gradient reaches
        `x` (x is neither an objective nor a wrt tensor); else None."""
        return self._sole_route(x, consumer)

    def rule_of(self, node: onnx.NodeProto) -> Callable | None:
        """The rule function that differentiates forward `node` in this graph."""
        return self._rule_of(node)

    def mark_premasked(self, g: str, node: onnx.NodeProto) -> None:
        """Record that gradient `g`, flowing into the output of `node`, already carries the value mask
        that `node`'s rule would multiply in (a rule upstream applied it where it was cheaper)."""
        self._premasked[g] = node

    def premasked(self, g: str | None, node: onnx.NodeProto) -> bool:
        return g is not None and self._premasked.get(g) is node

    def offer_batch_sum(self, g: str, build: Callable[[], str]) -> None:
        """A rule that made gradient `g` knows a cheaper way to its sum over the batch (axis 0, kept):
        `build()` emits it. Used where `g` enters a batch-summed region (see batch_sum)."""
        self._batch_sums[g] = build

    def batch_sum(self, g: str, offered: bool = True) -> str:
        """`g` summed over axis 0 (keepdims): the form the rule that made `g` offered (if `offered`:
        worth it where `g` itself is used nowhere else), else ReduceSum. Whatever the offered form
        does not use of `g`'s own nodes is pruned with the graph."""
        build = self._batch_sums.pop(g, None) if offered else None
        summed = build() if build is not None else self.reduce("ReduceSum", g, [0], keepdims=True)
        if build is not None:
            self._batch_sums[g] = lambda: summed  # asked again (another entry point): the same tensor
        return summed

    def primal_output(self, node: onnx.NodeProto, index: int) -> str:
        """Name of output `index` of the primal node, adding that optional output if absent."""
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = self.fresh(f"{node.op_type}_out{index}")
        return node.output[index]

    # ---- opset-aware helpers ------------------------------------------------------------------
    def shape_of(self, x: str) -> str:
        """Run-time shape of `x` (one Shape node per tensor)."""
        if x not in self._shape_tensors:
            self._shape_tensors[x] = self.make_node("Shape", [x])
        return self._shape_tensors[x]

    def reshape_like(self, x: str, like: str) -> str:
        return self.make_node("Reshape", [x, self.shape_of(like)])

    def expand_like(self, x: str, like: str) -> str:
        return self.make_node("Expand", [x, self.shape_of(like)])

    def mask(self, op_type: str, a: str, b: str, like: str) -> str:
        """Float 0/1 tensor of comparison `op_type` (Greater, Less, ...) in the dtype of `like`."""
        return self.make_node("Cast", [self.make_node(op_type, [a, b])], to=self.elem_type(like))

    def not_mask(self, op_type: str, a: str, b: str, like: str) -> str:
        """Float 0/1 tensor of Not(a op b): e.g. a >= b as not_mask('Less', a, b)."""
        return self.make_node("Cast", [self.make_node("Not", [self.make_node(op_type, [a, b])])], to=self.elem_type(like))

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """ReduceSum/ReduceMean/...; axes None = all axes."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.make_node(op_type, [x], keepdims=int(keepdims))
        axes = [int(a) for a in axes]
        if axes_as_input:
            return self.make_node(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.make_node(op_type, [x], axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 13:
            return self.make_node("Unsqueeze", [x, self.ints(axes)])
        return self.make_node("Unsqueeze", [x], axes=axes)

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 13:
            return self.make_node("Squeeze", [x, self.ints(axes)])
        return self.make_node("Squeeze", [x], axes=axes)

    def slice(self, x: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
              steps: Sequence[int] | None = None) -> str:
        if self.opset >= 10:
            inputs = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
            if steps is not None:
                inputs.append(self.ints(steps))
            return self.make_node("Slice", inputs)
        if steps is not None and any(s != 1 for s in steps):
            raise Unimplemented(f"Slice with steps needs opset >= 10 (model has {self.opset})")
        return self.make_node("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))

    def pad(self, x: str, pads: Sequence[int]) -> str:
        """Zero padding (negative entries crop), pads = begins of all axes then ends."""
        pads = [int(p) for p in pads]
        if self.opset >= 11:
            return self.make_node("Pad", [x, self.ints(pads)], mode="constant")
        return self.make_node("Pad", [x], pads=pads, mode="constant", value=0.0)

    def split(self, x: str, axis: int, sizes: Sequence[int]) -> list[str]:
        sizes = [int(s) for s in sizes]
        if len(sizes) == 1:
            return [self.make_node("Identity", [x])]
        if self.opset >= 13:
            outs = self.make_node("Split", [x, self.ints(sizes)], num_outputs=len(sizes), axis=axis)
        else:
            outs = self.make_node("Split", [x], num_outputs=len(sizes), axis=axis, split=sizes)
        return list(outs)

    def scale_channels(self, g: str, factor: str, like: str) -> str:
        """g * factor along axis 1, where factor [C] depends on weights only; g has the shape of `like`.

        The product is recorded: a later scale of the result multiplies the factors
        instead (one pass over the tensor, not two), and the Conv rule folds a scaled
        gradient into its weights (see `channel_scale_of`). onnxruntime constant-folds
        the factor arithmetic, so folded scales cost nothing at run time.
        """
        unscaled, total = g, factor
        if g in self._channel_scales:
            unscaled, earlier = self._channel_scales[g]
            total = self.make_node("Mul", [earlier, factor])
        scaled = self._scaled_masked_conv(unscaled, total, like)
        if scaled is None:
            trailing = list(range(1, self.rank(like) - 1))   # [C] -> [C, 1, 1]; as it is for [N, C] (BatchNorm1d)
            scaled = self.make_node("Mul", [unscaled, self.unsqueeze(total, trailing) if trailing else total])
        self._channel_scales[scaled] = (unscaled, total)
        return scaled

    def _scaled_masked_conv(self, g: str, factor: str, like: str) -> str | None:
        """For g = Mul(Conv(h, W), mask) made here (a backward Conv, then a ReLU mask): the same with
        W's output channels scaled by `factor` ((c * mask) * f = (c * f) * mask); None otherwise.

        Why: where no Conv follows to take the factor (a DenseNet BatchNorm whose input comes from a
        Concat: the Split is next), the product would be a broadcast Mul, which onnxruntime runs
        outside its blocked NCHWc layout with reorders around it. The scaled weights are constants
        (folded by onnxruntime); the unscaled Conv, now unused, is pruned.
        """
        mul = self._producers.get(g)
        if mul is None or mul.op_type != "Mul":
            return None
        for position, candidate in enumerate(mul.input):
            conv = self._producers.get(candidate)
            if conv is not None and conv.op_type == "Conv" and len(conv.input) == 2:
                break
        else:
            return None
        weight = conv.input[1]
        shape = self._weight_shape(weight)
        channels = self.shape(like)[1] if self.rank(like) >= 2 else None
        if shape is None or len(shape) < 3 or not isinstance(channels, int) or shape[0] != channels:
            return None
        scaled_weight = self.make_node("Mul", [weight, self.make_node(
            "Reshape", [factor, self.ints([-1] + [1] * (len(shape) - 1))])])
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        product = self.make_node("Conv", [conv.input[0], scaled_weight], **attrs)
        inputs = list(mul.input)
        inputs[position] = product
        return self.make_node("Mul", inputs)

    def note_weight_shape(self, name: str, shape: Sequence[int]) -> None:
        """Record the static shape of a weight computed by emitted nodes (see _scaled_masked_conv)."""
        self._weight_shapes[name] = tuple(int(d) for d in shape)

    def _weight_shape(self, name: str) -> tuple | None:
        """Static shape of a weight: an initializer made here or in the model, or one of them scaled
        per channel by a Mul (as the Conv rule folds a channel scale); None when unknown."""
        if name in self._weight_shapes:
            return self._weight_shapes[name]
        value = self.constant_value(name)
        if value is not None:
            return value.shape
        node = self._producers.get(name)
        if node is not None and node.op_type == "Mul":
            return self._weight_shape(node.input[0])
        info = self._infos.get(name)
        if info is not None and info.shape is not None and all(isinstance(d, int) for d in info.shape):
            return tuple(info.shape)
        return None

    def channel_scale_of(self, g: str) -> tuple[str, str] | None:
        """(unscaled gradient, factor [C]) if g was made by `scale_channels`."""
        return self._channel_scales.get(g)

    def zeros(self, shape: str, like: str) -> str:
        """Zeros of run-time shape `shape` (an int64 tensor) in the element type of `like`."""
        value = numpy_helper.from_array(np.zeros(1, dtype=self.dtype(like)), "zero")
        return self.make_node("ConstantOfShape", [shape], value=value)

    def zeros_like(self, x: str) -> str:
        return self.zeros(self.shape_of(x), x)

    def add_all(self, terms: Sequence[str]) -> str:
        if len(terms) == 1:
            return terms[0]
        return self.make_node("Sum", list(terms))

    def sum_to(self, g: str, target: str, g_shape: Sequence | None = None) -> str:
        """Reduce broadcast gradient `g` to the shape of `target` (numpy broadcasting rules)."""
        g_shape = tuple(self.shape(g) if g_shape is None else g_shape)
        t_shape = self.shape(target)
        lead = len(g_shape) - len(t_shape)
        axes = list(range(lead))
        for i, td in enumerate(t_shape):
            gd = g_shape[lead + i]
            if td == 1 and gd != 1:
                axes.append(lead + i)
            elif td is None or (gd is None and td != 1) or (td != gd and not (isinstance(td, int) and isinstance(gd, int))):
                # cannot tell statically whether this axis was broadcast: reduce by run-time shape
                return self._sum_to_dynamic(g, target, len(g_shape), len(t_shape))
        if not axes:
            return g
        reduced = self.reduce("ReduceSum", g, axes, keepdims=True)
        if lead:
            reduced = self.reshape_like(reduced, target)
        return reduced

    def _sum_to_dynamic(self, g: str, target: str, g_rank: int, t_rank: int) -> str:
        # Pad the target shape with leading ones, compare with g's shape: reduce every axis
        # where they differ. ReduceSum with an axes *input* computed at run time needs opset 13.
        if self.opset < 13:
            raise Unimplemented(f"broadcast gradient to {target!r} with unknown dims needs opset >= 13")
        g_shape = self.shape_of(g)
        t_shape = self.shape_of(target)
        if g_rank > t_rank:
            t_shape = self.make_node("Concat", [self.ints([1] * (g_rank - t_rank)), t_shape], axis=0)
        differs = self.make_node("Not", [self.make_node("Equal", [g_shape, t_shape])])
        axes = self.make_node("Reshape", [self.make_node("NonZero", [differs]), self.ints([-1])])
        reduced = self.make_node("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
        return self.reshape_like(reduced, target)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default

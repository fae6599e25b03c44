"""Graph: a captured program as an FX GraphModule plus its weights and example inputs.

Weights are `get_attr` nodes whose targets are the parameters' module paths
(`model.layers.3.mlp.down_proj.weight`), so passes and reports can name them. Every
call node carries its module path in `node.meta["peakc_module"]`.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir import meta as ir_meta

MODULE_KEY = "peakc_module"
# a pruned linear's record (achieved sparsity, pattern, method, error), set by the prune pass
SPARSITY_KEY = "peakc_sparsity"
_LAYER_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class Block:
    """A contiguous group of nodes sharing a module path prefix, e.g. one transformer layer."""

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)

    def weights(self) -> list[str]:
        return [n.target for n in self.nodes if n.op == "get_attr"]


class Graph:
    """A captured program: GraphModule with weights as get_attr nodes, and example inputs."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple[torch.Tensor, ...],
        info: dict | None = None,
    ) -> None:
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.info = dict(info or {})

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        graph: fx.Graph,
        weights: dict[str, torch.Tensor],
        example_inputs: tuple[torch.Tensor, ...],
        info: dict | None = None,
    ) -> Graph:
        """Build from an fx.Graph whose get_attr targets are keys of `weights`."""
        root = {name: t.detach().requires_grad_(False) for name, t in weights.items()}
        return cls(fx.GraphModule(root, graph), example_inputs, info)

    def copy(self) -> Graph:
        """A structural copy sharing weight storage (passes that change weights replace them)."""
        new_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        result = new_graph.graph_copy(self.gm.graph, env)
        new_graph.output(result)
        for old, new in env.items():
            new.meta = dict(old.meta)
        return Graph.from_parts(new_graph, self.weights(), self.example_inputs, self.info)

    def specialized(self, example_inputs: tuple[torch.Tensor, ...], dynamic: dict | None) -> Graph:
        """The same program with other example inputs and dynamic dims (e.g. seq fixed to 1)."""
        out = self.copy()
        out.example_inputs = tuple(example_inputs)
        out.info = {k: v for k, v in self.info.items() if k != "dynamic"}
        if dynamic:
            out.info["dynamic"] = dynamic
        return out

    # --- weights ---------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by module path, in graph order."""
        return {
            n.target: self.get_weight(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"
        }

    def get_weight(self, name: str) -> torch.Tensor:
        try:
            return operator.attrgetter(name)(self.gm)
        except AttributeError:
            raise PeakcError(f"graph has no weight named '{name}'") from None

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Replace a weight's tensor (a compressed copy, say); the node and its users stay."""
        *path, leaf = name.split(".")
        owner = self.gm
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        value = value.detach().requires_grad_(False)
        if leaf in owner._buffers or leaf in owner._parameters:
            owner._buffers.pop(leaf, None)
            owner._parameters.pop(leaf, None)
        setattr(owner, leaf, value)

    def add_weight(self, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Add a new weight and its get_attr node, placed before `before`."""
        if any(n.op == "get_attr" and n.target == name for n in self.gm.graph.nodes):
            raise PeakcError(f"graph already has a weight named '{name}'")
        self.set_weight(name, value)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = ir_meta.fake_of(value)
        return node

    def replace_call(
        self, node: fx.Node, target: Any, args: tuple, drop: Iterable[Any] = ()
    ) -> fx.Node:
        """A call of `target(*args)` in `node`'s place (node's meta copied, its users
        rewired); then `node` is erased, and so is each node of `drop` (the weights it read)
        that nothing reads any more. Returns the new node."""
        with self.graph.inserting_before(node):
            new = self.graph.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        for old in drop:
            if isinstance(old, fx.Node) and not old.users:
                self.graph.erase_node(old)
        return new

    # --- structure -------------------------------------------------------------------------

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def output_nodes(self) -> list[fx.Node]:
        (out,) = [n for n in self.graph.nodes if n.op == "output"]
        return list(out.args[0])

    def call_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.graph.nodes if n.op == "call_function")

    def recompile(self) -> None:
        """Drop get_attr-less weights and regenerate code after a rewrite."""
        self.graph.lint()
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name in list(_tensor_attrs(self.gm)):
            if name not in used:
                *path, leaf = name.split(".")
                owner = operator.attrgetter(".".join(path))(self.gm) if path else self.gm
                delattr(owner, leaf)
        self.gm.recompile()

    # --- running ---------------------------------------------------------------------------

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Execute on real tensors (reference implementations for peakc ops)."""
        if not inputs:
            inputs = self.example_inputs
        with torch.no_grad():
            out = self.gm(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # --- checks and views ------------------------------------------------------------------

    def verify(self) -> None:
        """Raise PeakcError unless the graph is well formed and its recorded shapes hold."""
        try:
            self.graph.lint()
        except Exception as exc:  # fx raises RuntimeError with the offending node in the text
            raise PeakcError(f"graph is malformed: {exc}") from exc
        if len(self.input_nodes()) != len(self.example_inputs):
            raise PeakcError(
                f"graph has {len(self.input_nodes())} inputs but "
                f"{len(self.example_inputs)} example inputs"
            )
        for node in self.graph.nodes:
            if node.op in ("call_module", "call_method"):
                raise PeakcError(f"node '{node.name}': {node.op} is not allowed at ATen level")
            if node.op == "get_attr":
                self.get_weight(node.target)
        try:
            derived = ir_meta.propagate(self.gm, self.example_inputs)
        except Exception as exc:
            raise PeakcError(f"shape propagation failed: {_first_line(exc)}") from exc
        for node, val in derived.items():
            recorded = node.meta.get("val")
            if node.op == "output" or recorded is None:
                continue
            if not ir_meta.same_signature(recorded, val):
                raise PeakcError(
                    f"node '{node.name}' ({node.target}): recorded "
                    f"{ir_meta.describe(recorded)} but it computes {ir_meta.describe(val)}"
                )

    def propagate_meta(self) -> None:
        """Fill node.meta["val"] for nodes a rewrite created without it."""
        derived = ir_meta.propagate(self.gm, self.example_inputs)
        for node, val in derived.items():
            if node.op != "output" and node.meta.get("val") is None:
                node.meta["val"] = val

    def sparsity_record(self) -> dict[str, dict]:
        """Per pruned linear (by module path): the prune pass's record, for the manifest."""
        return {
            node.meta.get(MODULE_KEY, node.name): dict(node.meta[SPARSITY_KEY])
            for node in self.call_nodes()
            if SPARSITY_KEY in node.meta
        }

    def fingerprint(self) -> str:
        """Structural hash: ops, wiring, shapes and dtypes; not weight values or node names."""
        index: dict[fx.Node, int] = {}
        h = hashlib.sha256()
        for i, node in enumerate(self.graph.nodes):
            index[node] = i
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
            target = (
                node.target
                if node.op != "get_attr"
                else ir_meta.describe(self.get_weight(node.target))
            )
            h.update(
                f"{node.op}|{target}|{args}|{ir_meta.describe(node.meta.get('val'))}\n".encode()
            )
        return h.hexdigest()[:16]

    def dump(self) -> str:
        """Readable text: one line per node with its shape and module path."""
        lines = []
        for node in self.graph.nodes:
            val = ir_meta.describe(node.meta.get("val"))
            where = node.meta.get(MODULE_KEY, "")
            suffix = f"  # {where}" if where else ""
            if node.op == "placeholder":
                lines.append(f"input %{node.name} : {val}")
            elif node.op == "get_attr":
                lines.append(f"weight %{node.name} = {node.target} : {val}")
            elif node.op == "output":
                outs = fx.node.map_arg(node.args[0], lambda n: f"%{n.name}")
                lines.append(f"return {_fmt(outs)}")
            else:
                args = fx.node.map_arg(node.args, lambda n: f"%{n.name}")
                kwargs = fx.node.map_arg(node.kwargs, lambda n: f"%{n.name}")
                call = ", ".join([*map(_fmt, args), *(f"{k}={_fmt(v)}" for k, v in kwargs.items())])
                lines.append(f"%{node.name} = {_target_name(node.target)}({call}) : {val}{suffix}")
        return "\n".join(lines) + "\n"

    def blocks(self) -> list[Block]:
        """Nodes grouped by module path prefix: one block per numbered layer (`layers.3`).

        Nodes outside numbered layers form blocks named `prologue`, `epilogue` or
        `between.N`. Weights belong to the block of their first user.
        """
        blocks: list[Block] = []
        keys: list[str] = []
        for node in self.call_nodes():
            match = _LAYER_RE.match(node.meta.get(MODULE_KEY, ""))
            key = match.group(1) if match else ""
            if not keys or keys[-1] != key:
                keys.append(key)
                blocks.append(Block(name=key, nodes=[]))
            blocks[-1].nodes.append(node)
        for i, block in enumerate(blocks):
            if not block.name:
                last = i == len(blocks) - 1
                block.name = "prologue" if i == 0 else "epilogue" if last else f"between.{i}"
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        member = {n: b for b in blocks for n in b.nodes}
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.users:
                first = min(node.users, key=position.__getitem__)
                if first in member:
                    member[first].nodes.insert(0, node)
                    member[node] = member[first]
        for block in blocks:
            inside = set(block.nodes)
            for node in block.nodes:
                for arg in node.all_input_nodes:
                    if arg not in inside and arg not in block.inputs:
                        block.inputs.append(arg)
                if any(u not in inside for u in node.users):
                    block.outputs.append(node)
        return blocks


def _tensor_attrs(module: torch.nn.Module, prefix: str = "") -> Iterator[str]:
    for key, val in vars(module).items():
        if isinstance(val, torch.Tensor) and not key.startswith("_"):
            yield prefix + key
    for key in module._buffers:
        yield prefix + key
    for key in module._parameters:
        yield prefix + key
    for name, child in module.named_children():
        yield from _tensor_attrs(child, f"{prefix}{name}.")


def _target_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::", 1)
        overload = target._overloadname
        base = f"{ns}.{name}"
        return base if overload == "default" else f"{base}.{overload}"
    return getattr(target, "__name__", str(target))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt(v) for v in value)
        return f"[{inner}]"
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

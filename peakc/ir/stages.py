"""Pipeline stages of a Graph: the units a cut may fall between, and the programs of a cut.

A cut falls only between units, never inside a residual path: the prologue (embedding,
rotary tables), each numbered layer together with the unnamed blocks inside or right after
it (residual adds, reshapes between its modules), and the epilogue (final norm, head).
A stage's program takes the values live across the cut before it and returns those live
across the cut after it, so stage s + 1 reads exactly what stage s sends: the chain
torch.distributed.pipelining's stages expect. A generation decoder's KV cache stays on its
stage: each stage takes and returns the cache of its own layers (`[layers of the stage, B,
kv_heads, max_len, D]`) instead of passing the whole cache down the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir.graph import Graph

CACHE_INPUTS = (2, 3)  # a generation decoder's (input_ids, positions, k_cache, v_cache)
CACHE_OUTPUTS = (1, 2)  # and its (logits, new_k, new_v)


@dataclass
class StageUnit:
    """The smallest piece a pipeline stage holds: the prologue, one layer, or the epilogue."""

    name: str
    nodes: list[fx.Node] = field(default_factory=list)

    def weights(self) -> list[str]:
        return [n.target for n in self.nodes if n.op == "get_attr"]


@dataclass
class CacheLayers:
    """Where a generation decoder reads and returns each layer's cache: per layer i, the
    `select(k_cache, 0, i)` / `select(v_cache, 0, i)` nodes and the new k/v values that the
    output stacks."""

    k_reads: dict[int, fx.Node]
    v_reads: dict[int, fx.Node]
    new_k: list[fx.Node]
    new_v: list[fx.Node]
    stacking: set[fx.Node]  # the nodes that stack new k/v for the output (dropped in stages)

    def layers_of(self, nodes: set[fx.Node]) -> list[int]:
        return sorted(i for i, n in self.k_reads.items() if n in nodes)


def stage_units(graph: Graph) -> list[StageUnit]:
    """Graph.blocks() merged into cut units: unnamed `between.N` blocks and repeated visits of
    one layer join the unit before them, so every cut lies on a layer boundary."""
    units: list[StageUnit] = []
    for block in graph.blocks():
        joins = units and (block.name.startswith("between.") or block.name == units[-1].name)
        if joins:
            units[-1].nodes.extend(block.nodes)
        else:
            units.append(StageUnit(block.name, list(block.nodes)))
    return units


def cache_layers(graph: Graph) -> CacheLayers | None:
    """The per-layer cache reads and writes of a generation decoder (None for other graphs);
    a decoder whose cache is not read per layer cannot keep its cache per stage."""
    if "generation" not in graph.info:
        return None
    inputs, outputs = graph.input_nodes(), graph.output_nodes()
    reads = []
    for index in CACHE_INPUTS:
        cache = inputs[index]
        per_layer = {}
        for user in cache.users:
            if user.target is not torch.ops.aten.select.int or user.args[1] != 0:
                raise PeakcError(
                    f"partition: cache input '{cache.name}' is read by '{user.name}', not "
                    "per layer (select along dim 0): its cache cannot be split into stages"
                )
            per_layer[int(user.args[2])] = user
        reads.append(per_layer)
    stacked, stacking = [], set()
    for index in CACHE_OUTPUTS:
        values, nodes = _stacked_values(outputs[index])
        if len(values) != len(reads[0]):
            raise PeakcError(
                f"partition: output '{outputs[index].name}' stacks {len(values)} values for "
                f"{len(reads[0])} cached layers"
            )
        stacked.append(values)
        stacking |= nodes
    return CacheLayers(reads[0], reads[1], stacked[0], stacked[1], stacking)


def _stacked_values(node: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """The per-layer values of `stack(values)` as captured: `view(cat(values), [L, ...])`."""
    if node.target is torch.ops.aten.stack.default:
        return list(node.args[0]), {node}
    if node.target is torch.ops.aten.view.default:
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.target is torch.ops.aten.cat.default:
            if len(inner.users) == 1 and (len(inner.args) < 2 or inner.args[1] == 0):
                return list(inner.args[0]), {node, inner}
    raise PeakcError(
        f"partition: output '{node.name}' is not a stack of per-layer values: the new keys "
        "and values cannot stay on their stages"
    )


def live_across(graph: Graph, units: list[StageUnit], cuts: list[int]) -> list[list[fx.Node]]:
    """Per cut (a unit index k: the cut before unit k), the values made before it and read at
    or after it, in graph order. Graph inputs count as made before every cut; the cache
    inputs and the values only the output's cache stacking reads are not carried."""
    caches = cache_layers(graph)
    skipped = set(caches.stacking) if caches else set()
    carried_inputs = [
        n for i, n in enumerate(graph.input_nodes()) if not (caches and i in CACHE_INPUTS)
    ]
    unit_of = {n: i for i, u in enumerate(units) for n in u.nodes}
    position = {n: i for i, n in enumerate(graph.graph.nodes)}
    cache_outputs = {graph.output_nodes()[i] for i in CACHE_OUTPUTS} if caches else set()
    last_read: dict[fx.Node, int] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr" or node in skipped:
            continue
        for user in node.users:
            if user in skipped:
                continue
            at = len(units) if user.op == "output" else unit_of[user]
            if user.op == "output" and node in cache_outputs:
                continue
            last_read[node] = max(last_read.get(node, -1), at)
    out = []
    for cut in cuts:
        live = [n for n in carried_inputs if last_read.get(n, -1) >= cut]
        live += [
            n
            for n in graph.call_nodes()
            if unit_of.get(n, len(units)) < cut and last_read.get(n, -1) >= cut
        ]
        out.append(sorted(live, key=position.__getitem__))
    return out


def split_stages(graph: Graph, boundaries: list[int]) -> list[Graph]:
    """One Graph per stage: stage s holds units boundaries[s]..boundaries[s+1]-1 (boundaries
    start at 0 and end at the number of units). Each stage's example inputs are the values
    the whole graph computes on its own example inputs, so the stages chain exactly."""
    units = stage_units(graph)
    if boundaries[0] != 0 or boundaries[-1] != len(units) or boundaries != sorted(set(boundaries)):
        raise PeakcError(f"partition: bad stage boundaries {boundaries} for {len(units)} units")
    caches = cache_layers(graph)
    live = live_across(graph, units, boundaries[1:-1])
    inputs = [n for i, n in enumerate(graph.input_nodes()) if not (caches and i in CACHE_INPUTS)]
    outputs = [n for i, n in enumerate(graph.output_nodes()) if not (caches and i in CACHE_OUTPUTS)]
    carried = [inputs, *live, outputs]
    values = _values_of(graph, {n for group in carried for n in group})
    symbols = _symbol_names(graph)
    stages = []
    for s, (lo, hi) in enumerate(zip(boundaries, boundaries[1:])):
        nodes = [n for unit in units[lo:hi] for n in unit.nodes]
        builder = _StageBuilder(graph, s, caches, symbols)
        stages.append(builder.build(nodes, carried[s], carried[s + 1], values))
    return stages


def _values_of(graph: Graph, wanted: set[fx.Node]) -> dict[fx.Node, object]:
    """The real values of `wanted` nodes on the graph's example inputs (one interpreted run)."""
    recorded: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            out = super().run_node(node)
            if node in wanted:
                recorded[node] = out
            return out

    with torch.no_grad():
        Recorder(graph.gm).run(*graph.example_inputs)
    return recorded


def _symbol_names(graph: Graph) -> dict[str, str]:
    """Each symbolic size of the graph's inputs ("s72") -> its dynamic dim's name ("batch")."""
    dynamic = graph.info.get("dynamic") or {}
    names: dict[str, str] = {}
    for node, spec in zip(graph.input_nodes(), dynamic.get("inputs", [])):
        val = node.meta.get("val")
        for index, name in spec.items():
            if isinstance(val, torch.Tensor):
                names[str(val.shape[int(index)])] = name
    return names


class _StageBuilder:
    """Builds one stage's Graph from the nodes of its units."""

    def __init__(
        self, graph: Graph, index: int, caches: CacheLayers | None, symbols: dict[str, str]
    ) -> None:
        self.graph = graph
        self.index = index
        self.caches = caches
        self.symbols = symbols
        self.out = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}

    def build(
        self,
        nodes: list[fx.Node],
        takes: list[fx.Node],
        gives: list[fx.Node],
        values: dict[fx.Node, object],
    ) -> Graph:
        position = {n: i for i, n in enumerate(self.graph.graph.nodes)}
        inside = set(nodes)
        layers = self.caches.layers_of(inside) if self.caches else []
        tensors = [n for n in takes if isinstance(values.get(n), torch.Tensor)]
        example = [values[n] for n in tensors]
        specs = []
        for node in tensors:
            placeholder = self.out.placeholder(node.name)
            placeholder.meta = {"val": node.meta.get("val")}
            self.env[node] = placeholder
            specs.append(self._dims_spec(node.meta.get("val")))
        local = self._local_caches(layers, example, specs)
        for node in takes:
            if node not in self.env:
                self.env[node] = self._size_from_inputs(node, tensors)
        for node in sorted(nodes, key=position.__getitem__):
            if node.op == "get_attr" or (self.caches and node in self.caches.stacking):
                continue
            read = self._cache_read(node, layers, local)
            self.env[node] = read if read is not None else self.out.node_copy(node, self._arg)
        results = [self._arg(n) for n in gives if isinstance(values.get(n), torch.Tensor)]
        if layers:
            for new in (self.caches.new_k, self.caches.new_v):
                stack = self.out.call_function(
                    torch.ops.aten.stack.default, ([self.env[new[i]] for i in layers], 0)
                )
                results.append(stack)
        self.out.output(tuple(results))
        weights = {
            n.target: self.graph.get_weight(n.target) for n in self.out.nodes if n.op == "get_attr"
        }
        info = {k: v for k, v in self.graph.info.items() if k not in ("dynamic", "partition")}
        info["stage"] = {"index": self.index, "layers": [layers[0], layers[-1]] if layers else []}
        dynamic = self.graph.info.get("dynamic")
        if dynamic:
            info["dynamic"] = {"dims": dynamic["dims"], "inputs": specs}
        stage = Graph.from_parts(self.out, weights, tuple(example), info)
        stage.propagate_meta()
        return stage

    def _arg(self, node: fx.Node) -> fx.Node:
        """A node's value inside the stage; a weight another stage also reads (tied
        embeddings) gets its own get_attr here."""
        if node not in self.env and node.op == "get_attr":
            self.env[node] = self.out.get_attr(node.target)
            self.env[node].meta = dict(node.meta)
        if node not in self.env:
            raise PeakcError(
                f"partition: stage {self.index} reads '{node.name}', not carried to it"
            )
        return self.env[node]

    def _local_caches(
        self, layers: list[int], example: list[torch.Tensor], specs: list[dict]
    ) -> tuple[fx.Node, fx.Node] | None:
        """Placeholders for the stage's own k/v cache (its layers only), with example values."""
        if not layers:
            return None
        inputs = self.graph.input_nodes()
        dynamic = self.graph.info.get("dynamic") or {}
        local = []
        for index in CACHE_INPUTS:
            whole = self.graph.example_inputs[index]
            placeholder = self.out.placeholder(inputs[index].name)
            local.append(placeholder)
            example.append(whole[layers[0] : layers[-1] + 1].clone())
            if dynamic:
                specs.append(dict(dynamic["inputs"][index]))
        return local[0], local[1]

    def _cache_read(
        self, node: fx.Node, layers: list[int], local: tuple[fx.Node, fx.Node] | None
    ) -> fx.Node | None:
        """`select(cache, 0, i)` becomes `select(stage cache, 0, i - first layer)`."""
        if not self.caches or local is None:
            return None
        for reads, cache in ((self.caches.k_reads, local[0]), (self.caches.v_reads, local[1])):
            for layer, read in reads.items():
                if read is node:
                    new = self.out.call_function(
                        torch.ops.aten.select.int, (cache, 0, layer - layers[0])
                    )
                    new.meta = {k: v for k, v in node.meta.items() if k != "val"}
                    return new
        return None

    def _size_from_inputs(self, node: fx.Node, tensors: list[fx.Node]) -> fx.Node:
        """A symbolic size carried across the cut, read again from a carried tensor's shape."""
        size = str(node.meta.get("val"))
        for tensor in tensors:
            val = tensor.meta.get("val")
            dims = [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else []
            if size in dims:
                new = self.out.call_function(
                    torch.ops.aten.sym_size.int, (self.env[tensor], dims.index(size))
                )
                new.meta = {"val": node.meta.get("val")}
                return new
        raise PeakcError(
            f"partition: value '{node.name}' ({size}) crosses into stage {self.index} and is "
            "not a tensor nor a size of one"
        )

    def _dims_spec(self, val: object) -> dict[str, str]:
        """The dynamic dims of a carried tensor, named like the graph's inputs' ("batch")."""
        if not isinstance(val, torch.Tensor):
            return {}
        return {
            str(i): self.symbols[str(d)] for i, d in enumerate(val.shape) if str(d) in self.symbols
        }


__all__ = ["StageUnit", "cache_layers", "live_across", "split_stages", "stage_units"]

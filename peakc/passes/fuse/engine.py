"""The fusion rule engine: each rule matches from an anchor node, checks, and rewrites.

A rule's `match` returns a Match (the nodes it replaces, the outputs they expose and what the
rewrite needs) or a string saying why it did not match: the near-miss reason reported by
`--explain-fusion`. Before committing a rewrite the engine refuses matches whose inner values
escape, refuses rewrites that would create a cycle, and checks that every replacement has the
shape and dtype of the value it replaces; a rule that breaks that contract raises PeakcError
naming the rule and leaves the graph as it was.
"""

from __future__ import annotations

import heapq
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from peakc.errors import PeakcError
from peakc.ir import meta as ir_meta
from peakc.ir.graph import MODULE_KEY, Graph
from peakc.passes.cleanup import _is_pure


@dataclass
class Match:
    """Nodes a rewrite replaces; `outputs` are the values still visible outside the match."""

    outputs: list[fx.Node]
    nodes: list[fx.Node]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> fx.Node:
        return self.outputs[0]


class FusionRule:
    """One fusion: `is_anchor` picks candidate nodes, `match` checks, `rewrite` emits new nodes.

    `rewrite` runs with the graph's insertion point just after the match's last input and
    returns one replacement node per `Match.outputs` entry (a node or a list of nodes).
    """

    name: ClassVar[str] = ""

    def prepare(self, graph: Graph) -> None:
        """Called once per graph before matching (pattern rules index their matches here)."""

    def is_anchor(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def match(self, node: fx.Node) -> Match | str:
        raise NotImplementedError

    def rewrite(self, graph: Graph, match: Match) -> fx.Node | list[fx.Node]:
        raise NotImplementedError


@dataclass
class RuleReport:
    matched: int = 0
    near_misses: list[str] = field(default_factory=list)


def escaping_node(match: Match) -> fx.Node | None:
    """An inner node of the match used outside it (which would make the rewrite wrong)."""
    inside = set(match.nodes)
    for node in match.nodes:
        if node in match.outputs:
            continue
        if any(user not in inside for user in node.users):
            return node
    return None


def external_inputs(match: Match) -> list[fx.Node]:
    """Nodes outside the match that its nodes read."""
    inside = set(match.nodes)
    seen: dict[fx.Node, None] = {}
    for node in match.nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen[arg] = None
    return list(seen)


def cycle_through(match: Match) -> fx.Node | None:
    """An input of the match that depends on one of its outputs through outside nodes."""
    inputs = set(external_inputs(match))
    inside = set(match.nodes)
    stack = [u for out in match.outputs for u in out.users if u not in inside]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in inputs:
            return node
        stack.extend(node.users)
    return None


def infer_val(node: fx.Node) -> Any:
    """The meta value of a new call node, from its inputs' meta values (meta-device tensors).

    Symbolic (dynamic) sizes are replaced by their example hints, so the result is concrete;
    checks compare it with the replaced node's value treating symbolic sizes as wildcards.
    """

    def as_meta(arg: fx.Node) -> Any:
        val = arg.meta.get("val")
        if val is None:
            raise PeakcError(f"node '{arg.name}' has no recorded value")
        return _to_meta(val)

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), as_meta)
    with torch.no_grad():
        return _to_meta(node.target(*args, **kwargs))


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    if hint is None:
        raise PeakcError(f"size {size} has no example value to infer shapes with")
    return int(hint)


def _to_meta(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        shape = tuple(_hint(d) for d in val.shape)
        stride = tuple(_hint(d) for d in val.stride())
        return torch.empty_strided(shape, stride, dtype=val.dtype, device="meta")
    if isinstance(val, torch.SymInt):
        return _hint(val)
    if isinstance(val, (tuple, list)):
        return type(val)(_to_meta(v) for v in val)
    return val


def apply_rule(graph: Graph, rule: FusionRule) -> RuleReport:
    """Match and rewrite every anchor of `rule` in graph order."""
    report = RuleReport()
    rule.prepare(graph)
    for node in list(graph.graph.nodes):
        if node._erased or not rule.is_anchor(node):
            continue
        found = rule.match(node)
        if isinstance(found, str):
            report.near_misses.append(f"{rule.name}: node '{node.name}': {found}")
            continue
        escaped = escaping_node(found)
        if escaped is not None:
            report.near_misses.append(
                f"{rule.name}: node '{node.name}': inner value '{escaped.name}' is used outside"
            )
            continue
        looped = cycle_through(found)
        if looped is not None:
            report.near_misses.append(
                f"{rule.name}: node '{node.name}': rewrite would create a cycle through "
                f"'{looped.name}'"
            )
            continue
        commit(graph, rule, found)
        report.matched += 1
    return report


def commit(graph: Graph, rule: FusionRule, match: Match) -> None:
    """Run the rewrite, check its values against the replaced outputs, then swap them in."""
    before = set(graph.graph.nodes)
    position = {n: i for i, n in enumerate(graph.graph.nodes)}
    inputs = external_inputs(match)
    anchor = max(inputs, key=position.__getitem__) if inputs else next(iter(graph.graph.nodes))
    where = match.output.meta.get(MODULE_KEY, "")
    try:
        with graph.graph.inserting_before(anchor.next):
            produced = rule.rewrite(graph, match)
        replacements = produced if isinstance(produced, list) else [produced]
        created = [n for n in graph.graph.nodes if n not in before]
        for new in created:
            if new.op == "call_function" and new.meta.get("val") is None:
                new.meta["val"] = infer_val(new)
            new.meta.setdefault(MODULE_KEY, where)
        _check_replacements(rule, match, replacements)
    except Exception as exc:
        for new in reversed([n for n in graph.graph.nodes if n not in before]):
            graph.graph.erase_node(new)
        if isinstance(exc, PeakcError) and str(exc).startswith(f"fusion rule '{rule.name}'"):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeakcError(
            f"fusion rule '{rule.name}': rewrite of '{match.output.name}' failed: {detail}"
        ) from exc
    for old, new in zip(match.outputs, replacements):
        if new is not old:
            old.replace_all_uses_with(new)
    for inner in sorted(match.nodes, key=position.__getitem__, reverse=True):
        if not inner.users and inner.graph is graph.graph:
            graph.graph.erase_node(inner)
    erase_orphans(graph.graph, inputs)
    if not _in_order(graph.graph):
        stable_topological_sort(graph.graph)


def erase_orphans(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase pure nodes that only fed what a rewrite replaced (e.g. a KV repeat, a mask)."""
    stack = list(candidates)
    while stack:
        node = stack.pop()
        if node.users or node.graph is not graph or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "call_function" and not _is_pure(node) and not _is_dead_view(node):
            continue
        stack.extend(node.all_input_nodes)
        graph.erase_node(node)


def _is_dead_view(node: fx.Node) -> bool:
    """An unused view (unsqueeze, slice, permute...): aliasing but not mutating, so erasable."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.is_mutable and not node.users


def _check_replacements(rule: FusionRule, match: Match, replacements: list[Any]) -> None:
    if len(replacements) != len(match.outputs):
        raise PeakcError(
            f"fusion rule '{rule.name}': rewrite returned {len(replacements)} values for "
            f"{len(match.outputs)} outputs"
        )
    for old, new in zip(match.outputs, replacements):
        if not isinstance(new, fx.Node):
            raise PeakcError(
                f"fusion rule '{rule.name}': rewrite returned {type(new).__name__}, not a node"
            )
        if not ir_meta.same_signature(old.meta.get("val"), new.meta.get("val")):
            raise PeakcError(
                f"fusion rule '{rule.name}': rewrite of '{old.name}' produces "
                f"{ir_meta.describe(new.meta.get('val'))} but the graph expects "
                f"{ir_meta.describe(old.meta.get('val'))}; graph left unchanged"
            )


def _in_order(graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if any(arg not in seen for arg in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the current order otherwise."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [index[n] for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, index[user])
    if len(order) != len(nodes):
        raise PeakcError("fusion left a cycle in the graph")
    cursor = nodes[0]
    for node in order[1:]:
        cursor.append(node)
        cursor = node


def new_weight(graph: Graph, name: str, value: torch.Tensor) -> fx.Node:
    """Add a weight whose get_attr sits at the top of the graph (before every user)."""
    unique, n = name, 1
    taken = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    with warnings.catch_warnings():  # fx warns about tensor attributes that are not buffers
        warnings.simplefilter("ignore", UserWarning)
        return graph.add_weight(unique, value, before=next(iter(graph.graph.nodes)))


def getitem(graph: Graph, node: fx.Node, index: int) -> fx.Node:
    """`node[index]` for a multi-output node, with its meta value."""
    return graph.graph.call_function(operator.getitem, (node, index))

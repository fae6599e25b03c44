"""Pattern rules: the ATen subgraph is a Python function, matched with torch.fx's SubgraphMatcher.

    class AddRelu(PatternRule):
        name = "add_relu"
        def pattern(self, x, y):
            return torch.ops.aten.relu.default(torch.ops.aten.add.Tensor(x, y))
        def rewrite(self, graph, match):
            return graph.graph.call_function(my_op, (match.values["x"], match.values["y"]))

`check(values)` may return a reason to refuse a match (reported as a near miss).
"""

from __future__ import annotations

import inspect

import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from peakc.errors import PeakcError
from peakc.ir.graph import Graph
from peakc.passes.fuse.engine import FusionRule, Match


class PatternRule(FusionRule):
    """A rule whose pattern is traced from `pattern`; its parameters name the match's inputs."""

    def pattern(self, *args: fx.Proxy) -> fx.Proxy:
        raise NotImplementedError

    def check(self, values: dict[str, fx.Node]) -> str | None:
        """A reason to refuse this match, or None to accept it."""
        return None

    def trace(self) -> fx.Graph:
        """The pattern as an FX graph; PeakcError naming the rule when it does not trace."""
        names = list(inspect.signature(self.pattern).parameters)
        try:
            graph = fx.symbolic_trace(_plain_function(self.pattern, names)).graph
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeakcError(
                f"fusion rule '{self.name}': pattern does not trace: {type(exc).__name__}: {detail}"
            ) from exc
        outputs = [n for n in graph.nodes if n.op == "output"]
        if not any(n.op == "call_function" for n in graph.nodes) or not isinstance(
            outputs[0].args[0], fx.Node
        ):
            raise PeakcError(
                f"fusion rule '{self.name}': pattern must return the result of one op call"
            )
        return graph

    def prepare(self, graph: Graph) -> None:
        pattern = self.trace()
        matcher = SubgraphMatcher(
            pattern,
            match_output=False,
            match_placeholder=False,
            remove_overlapping_matches=True,
            ignore_literals=False,
        )
        names = [n.name for n in pattern.nodes if n.op == "placeholder"]
        self._found: dict[fx.Node, Match] = {}
        for found in matcher.match(graph.graph):
            out = found.returning_nodes[0]
            inner = [g for p, g in found.nodes_map.items() if p.op == "call_function"]
            values = dict(zip(names, found.placeholder_nodes))
            self._found[out] = Match(outputs=[out], nodes=inner, values=values)

    def is_anchor(self, node: fx.Node) -> bool:
        return node in self._found

    def match(self, node: fx.Node) -> Match | str:
        found = self._found[node]
        if any(n.graph is not node.graph for n in found.nodes):
            return "overlaps an earlier rewrite"
        reason = self.check(found.values)
        return reason if reason else found


def _plain_function(method, names: list[str]):
    """A plain function with the pattern's parameter names (fx traces functions, not methods)."""
    if not all(n.isidentifier() for n in names):
        raise PeakcError(f"pattern parameters must be plain names, got {names}")
    arglist = ", ".join(names)
    scope = {"_pattern": method}
    exec(f"def pattern({arglist}):\n    return _pattern({arglist})\n", scope)  # noqa: S102
    return scope["pattern"]

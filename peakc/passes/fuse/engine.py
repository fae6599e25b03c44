"""The fusion rule engine: each rule matches from an anchor node, checks, and rewrites.

A rule's `match` returns a Match (the nodes it would replace, the output node and what the
rewrite needs) or a string saying why it did not match: the near-miss reason reported by
`--explain-fusion`. The engine refuses matches whose inner values escape the match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from peakc.ir.graph import MODULE_KEY, Graph


@dataclass
class Match:
    output: fx.Node
    nodes: list[fx.Node]
    values: dict[str, Any] = field(default_factory=dict)


class FusionRule:
    """One fusion: `anchors` picks candidate nodes, `match` checks, `rewrite` emits peakc ops."""

    name: ClassVar[str] = ""

    def is_anchor(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def match(self, node: fx.Node) -> Match | str:
        raise NotImplementedError

    def rewrite(self, graph: Graph, match: Match) -> fx.Node:
        raise NotImplementedError


@dataclass
class RuleReport:
    matched: int = 0
    near_misses: list[str] = field(default_factory=list)


def escaping_node(match: Match) -> fx.Node | None:
    """An inner node of the match used outside it (which would make the rewrite wrong)."""
    inside = set(match.nodes)
    for node in match.nodes:
        if node is match.output:
            continue
        if any(user not in inside for user in node.users):
            return node
    return None


def apply_rule(graph: Graph, rule: FusionRule) -> RuleReport:
    """Match and rewrite every anchor of `rule` in graph order."""
    report = RuleReport()
    for node in list(graph.graph.nodes):
        if node.graph is not graph.graph or not rule.is_anchor(node):
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
        with graph.graph.inserting_after(found.output):
            new = rule.rewrite(graph, found)
        new.meta["val"] = found.output.meta.get("val")
        new.meta[MODULE_KEY] = found.output.meta.get(MODULE_KEY, "")
        found.output.replace_all_uses_with(new)
        for inner in reversed(found.nodes):
            if not inner.users:
                graph.graph.erase_node(inner)
        report.matched += 1
    return report

"""MoE-fied dense models: each gated MLP split along its intermediate dimension into experts.

Expert e of a split MLP owns rows [e*I/E, (e+1)*I/E) of gate_proj and up_proj and the same
columns of down_proj. The activation is per intermediate unit, so the experts' outputs sum to
the dense MLP's exactly (up to float summation order): every expert is always active, and a
model with real weights becomes a mixture of experts whose compression can be measured
(QMoE's measurements need real expert weights; random ones compress unrealistically).
Captured, the experts' nodes sit under `...mlp.experts.E.*` and carry their index
(peakc/ir/experts.py).
"""

from __future__ import annotations

import torch

from peakc.errors import PeakcError

GATED_MLP = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(torch.nn.Module):
    """One expert: down(act(gate(x)) * up(x)), a slice of the dense MLP's units."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class AllActiveExperts(torch.nn.Module):
    """A dense gated MLP as the sum of `len(experts)` experts that all see every token."""

    def __init__(self, mlp: torch.nn.Module, num_experts: int) -> None:
        super().__init__()
        units = mlp.gate_proj.weight.shape[0]
        if num_experts < 1 or units % num_experts:
            raise PeakcError(
                f"moe: {units} MLP units do not split into {num_experts} equal experts"
            )
        size = units // num_experts
        self.experts = torch.nn.ModuleList(
            ExpertMLP(
                mlp.gate_proj.weight[e * size : (e + 1) * size],
                mlp.up_proj.weight[e * size : (e + 1) * size],
                mlp.down_proj.weight[:, e * size : (e + 1) * size],
                mlp.act_fn,
            )
            for e in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for expert in self.experts:  # not experts[1:]: a sliced ModuleList blurs module paths
            y = expert(x)
            out = y if out is None else out + y
        return out


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    return layer


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """A Llama-style MLP (gate_proj, up_proj, down_proj without biases, and act_fn)."""
    layers = [getattr(module, name, None) for name in GATED_MLP]
    return all(
        isinstance(layer, torch.nn.Linear) and layer.bias is None for layer in layers
    ) and hasattr(module, "act_fn")


def moefy(model: torch.nn.Module, num_experts: int) -> int:
    """Replace every gated MLP of `model` in place by `num_experts` all-active experts;
    returns how many MLPs were split. A model without gated MLPs is an error."""
    targets = [
        (name, module) for name, module in model.named_modules() if name and is_gated_mlp(module)
    ]
    if not targets:
        raise PeakcError(
            f"moe: {type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj) to split"
        )
    for name, mlp in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AllActiveExperts(mlp, num_experts))
    return len(targets)

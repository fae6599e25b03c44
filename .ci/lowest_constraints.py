"""Print pip constraints pinning each dependency of pyproject.toml at its declared lower bound
(`name>=X` -> `name==X`), for CI's lowest-versions run. Usage: lowest_constraints.py [EXTRA ...]

torch is pinned at TORCH instead: CI installs that version (its lower bound, 2.11, is not
tested here).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCH = "2.13.0"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def lower_bound_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra '{extra}' (has: {', '.join(optional)})")
        requirements += optional[extra]
    pins = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"cannot read requirement '{requirement}'")
        name, specifiers = match.group(1).lower().replace("_", "-"), match.group(2)
        if name == "torch":
            pins[name] = TORCH
            continue
        bound = re.search(r">=\s*([^,\s]+)", specifiers)
        if bound is None:
            raise SystemExit(f"requirement '{requirement}' declares no lower bound (>=)")
        pins[name] = bound.group(1)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(lower_bound_pins(root / "pyproject.toml", sys.argv[1:])))

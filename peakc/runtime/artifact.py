"""Artifacts: a self-contained directory that loads and runs without the model's code.

Layout (format version 1):
    manifest.json          format, versions, pipeline, backend, programs, sha256 of every file
    weights.safetensors    every weight by module path
    inputs.safetensors     the example inputs (input_0, input_1, ...) except all-zero ones
                           (an empty KV cache): those are `zero_inputs` in the manifest, by
                           dtype and shape, and are rebuilt as zeros on load
    <program>.pt2          torch.export archive of the program with weights as leading inputs
                           (no weights, constants or sample inputs inside, so nothing pickled)
    report.json, report.md per-pass time and stats, backend notes

Written into a temporary sibling folder and renamed into place, so a failed write leaves
nothing behind. `load_artifact` refuses missing, changed or extra files, archives that
carry pickled payloads, and artifacts from an incompatible format version.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from peakc.errors import PeakcError
from peakc.ir.capture import export_dynamic_shapes
from peakc.ir.graph import MODULE_KEY, Graph
from peakc.runtime.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    _list_files,
    read_manifest,
    sha256_file,
    verify_files,
)
from peakc.version import __version__

WEIGHTS = "weights.safetensors"
INPUTS = "inputs.safetensors"
ZERO_INPUTS = "zero_inputs"  # manifest key: {"input_3": {"dtype": "float32", "shape": [...]}}

# Entries a weightless torch.export archive may hold; anything else (pickled tensors) is refused.
_ARCHIVE_ALLOWED = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)


def peakc_version() -> str:
    return __version__


@dataclass
class ProgramFile:
    """One exported program: its file and its calling convention."""

    file: str
    weights: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    dynamic: dict[str, Any] | None = None  # capture's dynamic-shape spec (dims and limits)
    format: str = "torch.export"  # or "onnx" (peakc/backends/ort), run by onnxruntime
    runtime: dict[str, Any] = field(default_factory=dict)  # options for the program's runner


PROGRAM_SUFFIX = {"torch.export": "pt2", "onnx": "onnx", "triton": "triton.json"}

# loader(path, runtime options of the manifest's program entry) -> callable program
ProgramLoader = Callable[[Path, dict[str, Any]], Callable]
_PROGRAM_LOADERS: dict[str, ProgramLoader] = {}

# The module of each backend whose programs need a loader from outside the runtime; importing it
# registers the loader (torch.export programs, the eager backend's, load without one).
BACKEND_MODULES = {
    "ort": "peakc.backends.ort.session",
    "triton": "peakc.backends.triton.program",
}


def register_program_format(format: str, loader: ProgramLoader) -> None:
    """Let artifacts' programs of `format` be opened by `loader` (a backend calls this when its
    module is imported)."""
    _PROGRAM_LOADERS[format] = loader


def program_loader(format: str, backend: str, directory: Path) -> ProgramLoader:
    """The loader for `format`, importing the artifact's backend module when none is registered
    yet; a format nothing loads is an error naming it and the artifact."""
    if format not in _PROGRAM_LOADERS and backend in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[backend])
    if format not in _PROGRAM_LOADERS:
        raise PeakcError(
            f"artifact {directory}: no loader for program format '{format}' (backend '{backend}')"
        )
    return _PROGRAM_LOADERS[format]


@dataclass
class ArtifactContents:
    """Everything an artifact directory holds, before it is written."""

    backend: str
    pipeline: str
    source: str
    weights: dict[str, torch.Tensor]
    example_inputs: tuple[torch.Tensor, ...]
    programs: dict[str, tuple[bytes, ProgramFile]]
    report: dict[str, Any] = field(default_factory=dict)
    report_md: str = ""
    extra_files: dict[str, bytes | Path] = field(default_factory=dict)  # Path: moved in
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    # more safetensors files by name, e.g. one per pipeline stage, so a rank reads only its own
    weight_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def tensor_signature(t: torch.Tensor, name: str, dynamic: dict | None = None) -> dict[str, Any]:
    """Name, dtype and shape; dynamic dimensions are given by their name (e.g. "seq")."""
    shape: list[int | str] = [d if isinstance(d, int) else str(d) for d in t.shape]
    for index, dim_name in (dynamic or {}).items():
        shape[int(index)] = dim_name
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": shape}


def export_program(graph: Graph) -> tuple[bytes, ProgramFile]:
    """torch.export the graph with its weights turned into leading inputs; return the archive."""
    weight_nodes = [n for n in graph.graph.nodes if n.op == "get_attr"]
    program = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(weight_nodes):
        env[node] = program.placeholder(f"w{i}")
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            new = env[node] = program.node_copy(node, env.__getitem__)
            path = node.meta.get(MODULE_KEY)
            if path:  # export carries nn_module_stack through, so module paths survive a reload
                new.meta["nn_module_stack"] = {f"peakc.{path}": (path, "peakc")}
    gm = fx.GraphModule({}, program)
    weights = [graph.get_weight(n.target) for n in weight_nodes]
    dynamic = graph.info.get("dynamic")
    shapes = export_dynamic_shapes(dynamic, leading=len(weights))
    try:
        with torch.no_grad():
            exported = torch.export.export(
                gm, (*weights, *graph.example_inputs), dynamic_shapes=shapes, strict=False
            )
    except Exception as exc:
        raise PeakcError(f"cannot export the transformed program: {_first_line(exc)}") from exc
    exported._example_inputs = None  # would be pickled into the archive
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"][len(weights) :]
    (output,) = [n for n in exported.graph.nodes if n.op == "output"]
    values = (
        [n.meta.get("val") for n in placeholders],
        [a.meta.get("val") if isinstance(a, fx.Node) else None for a in output.args[0]],
    )
    info = program_signature(graph, [n.target for n in weight_nodes], values=values)
    return buffer.getvalue(), info


def program_signature(
    graph: Graph,
    weights: list[str],
    format: str = "torch.export",
    values: tuple[list, list] | None = None,
) -> ProgramFile:
    """The program's calling convention: weight names, then inputs and outputs with named
    dynamic dimensions. `values`: the exported program's own (input, output) values, when it
    was re-traced (its sizes are the ones that hold); otherwise the graph's recorded values."""
    dynamic = graph.info.get("dynamic")
    in_vals = [n.meta.get("val") for n in graph.input_nodes()]
    out_vals = [n.meta.get("val") for n in graph.output_nodes()]
    if values is not None:
        in_vals, out_vals = values
    input_specs = (dynamic or {}).get("inputs") or [{}] * len(graph.example_inputs)
    symbols: dict[str, str] = {}  # symbolic size (e.g. "s27") -> dynamic dim name ("seq")
    for val, spec in zip(in_vals, input_specs):
        for index, dim_name in spec.items():
            if isinstance(val, torch.Tensor):
                symbols[str(val.shape[int(index)])] = dim_name
    return ProgramFile(
        file="",
        format=format,
        weights=weights,
        inputs=[
            tensor_signature(t, n.name, spec)
            for t, n, spec in zip(graph.example_inputs, graph.input_nodes(), input_specs)
        ],
        outputs=[
            _named_dims(tensor_signature(v, f"output_{i}"), symbols)
            if isinstance(v, torch.Tensor)
            else {"name": f"output_{i}"}
            for i, v in enumerate(out_vals)
        ],
        dynamic=dynamic,
    )


def check_replaceable(directory: str | Path, force: bool) -> None:
    """An existing output may be replaced only with `force`, and only when it is a peakc
    artifact (a folder whose manifest says so): a user's file or folder is never deleted."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if not force:
        raise PeakcError(f"output folder {directory} already exists (use --force to replace it)")
    if directory.is_symlink() or not directory.is_dir():
        raise PeakcError(
            f"output {directory} is a file, not a peakc artifact: --force replaces only peakc "
            "artifacts; remove it yourself or choose another -o"
        )
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PeakcError(
            f"output folder {directory} is not a peakc artifact (no peakc {MANIFEST}): --force "
            "replaces only peakc artifacts; remove it yourself or choose another -o"
        )


def write_artifact(
    contents: ArtifactContents,
    directory: str | Path,
    force: bool = False,
    before_report: Callable[[ArtifactContents], None] | None = None,
) -> Path:
    """Write atomically: a temporary sibling folder, checksummed, then renamed into place.
    `force` replaces an existing peakc artifact, never anything else (check_replaceable).
    The report is written after every other file, so `before_report` (called just before it)
    can record how long the rest took."""
    directory = Path(directory)
    check_replaceable(directory, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_contiguous(contents.weights), str(staging / WEIGHTS))
        for rel, tensors in contents.weight_files.items():
            save_file(_contiguous(tensors), str(staging / rel))
        stored, zeros = split_zero_inputs(contents.example_inputs)
        save_file(stored, str(staging / INPUTS))
        programs = {}
        for name, (data, info) in contents.programs.items():
            info.file = f"{name}.{PROGRAM_SUFFIX[info.format]}"
            (staging / info.file).write_bytes(data)
            programs[name] = vars(info)
        for rel, data in contents.extra_files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):  # a large file already on disk (ONNX external data)
                shutil.move(data, staging / rel)
            else:
                (staging / rel).write_bytes(data)
        if before_report is not None:
            before_report(contents)
        (staging / "report.json").write_text(json.dumps(contents.report, indent=2, default=str))
        (staging / "report.md").write_text(contents.report_md)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "peakc_version": peakc_version(),
            "torch_version": torch.__version__,
            "backend": contents.backend,
            "pipeline": contents.pipeline,
            "source": contents.source,
            "programs": programs,
            "ops": sorted(_custom_namespaces(contents)),
            **({ZERO_INPUTS: zeros} if zeros else {}),
            **contents.extra_manifest,
            "files": {rel: sha256_file(staging / rel) for rel in _list_files(staging)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _make_readable(staging)
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, trash / "old")
            os.rename(staging, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def save_graph_artifact(
    graph: Graph,
    directory: str | Path,
    pipeline: str = "none",
    backend: str = "eager",
    report: dict | None = None,
    report_md: str = "",
    force: bool = False,
) -> Path:
    """Save a graph as an eager artifact (used by the eager backend and by reproducers)."""
    data, info = export_program(graph)
    contents = ArtifactContents(
        backend=backend,
        pipeline=pipeline,
        source=graph.info.get("name", "graph"),
        weights=graph.weights(),
        example_inputs=graph.example_inputs,
        programs={"forward": (data, info)},
        report=report or {},
        report_md=report_md,
    )
    return write_artifact(contents, directory, force=force)


class LoadedArtifact:
    """A verified artifact directory: call it like the original model's forward."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.weights = load_file(str(directory / WEIGHTS))
        self.example_inputs = read_example_inputs(directory, manifest)
        self._programs: dict[str, Callable] = {}

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def default_program(self) -> str:
        """The program `__call__` runs: the first one in the manifest (e.g. forward, decoder)."""
        return next(iter(self.manifest["programs"]))

    def program(self, name: str | None = None) -> Callable:
        name = name or self.default_program
        if name not in self._programs:
            info = self.manifest["programs"].get(name)
            if info is None:
                raise PeakcError(f"artifact {self.directory} has no program '{name}'")
            format = info.get("format", "torch.export")
            load = program_loader(format, self.backend, self.directory)
            self._programs[name] = load(self.directory / info["file"], info.get("runtime", {}))
        return self._programs[name]

    def weight_list(self, name: str | None = None) -> list[torch.Tensor]:
        name = name or self.default_program
        return [self.weights[w] for w in self.manifest["programs"][name]["weights"]]

    def check_inputs(self, inputs: tuple[torch.Tensor, ...], name: str | None = None) -> None:
        name = name or self.default_program
        program = self.manifest["programs"][name]
        expected = program["inputs"]
        limits = (program.get("dynamic") or {}).get("dims", {})
        if len(inputs) != len(expected):
            raise PeakcError(f"program '{name}' takes {len(expected)} inputs, got {len(inputs)}")
        for t, spec in zip(inputs, expected):
            dtype = str(t.dtype).removeprefix("torch.")
            shape = list(t.shape)
            ok = dtype == spec["dtype"] and len(shape) == len(spec["shape"])
            for size, want in zip(shape, spec["shape"]):
                if isinstance(want, str):
                    lo, hi = limits.get(want, (1, size))
                    ok = ok and lo <= size <= hi
                else:
                    ok = ok and size == want
            if not ok:
                bounds = "".join(f", {d} in [{lo}, {hi}]" for d, (lo, hi) in limits.items())
                raise PeakcError(
                    f"input '{spec['name']}': expected {spec['dtype']}{spec['shape']}{bounds}, "
                    f"got {dtype}{shape}"
                )

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = inputs or self.example_inputs
        self.check_inputs(inputs)
        with torch.no_grad():
            out = self.program()(*self.weight_list(), *inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def to_graph(self) -> Graph:
        """The forward program as a Graph again (weights back as get_attr nodes)."""
        from peakc.ir.capture import from_exported

        program = self.manifest["programs"][self.default_program]
        format = program.get("format", "torch.export")
        if format != "torch.export":
            raise PeakcError(
                f"artifact {self.directory}: its program is {format.replace('onnx', 'ONNX')} "
                f"({self.backend} backend) and cannot be read back as a graph; start from the "
                "source model instead"
            )
        exported = _load_exported(self.directory / program["file"])
        weights = tuple(self.weight_list(self.default_program))
        graph = from_exported(exported, weights + self.example_inputs)
        weight_names = program["weights"]
        inputs = graph.input_nodes()
        for node, name in zip(inputs, weight_names):
            graph.set_weight(name, self.weights[name])
            with graph.graph.inserting_before(node):
                attr = graph.graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.graph.erase_node(node)
        graph.example_inputs = self.example_inputs
        graph.info["name"] = self.manifest.get("source", str(self.directory))
        if program.get("dynamic"):
            graph.info["dynamic"] = program["dynamic"]
        graph.recompile()
        return graph


def split_zero_inputs(
    inputs: tuple[torch.Tensor, ...],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(tensors to store by name, dtype and shape of the all-zero ones by name): a zero KV
    cache is described in the manifest instead of being stored (tens of MB for a real model)."""
    stored: dict[str, torch.Tensor] = {}
    zeros: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(inputs):
        if _all_zero(t):
            zeros[f"input_{i}"] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
            }
        else:
            stored[f"input_{i}"] = t.contiguous()
    return stored, zeros


def read_example_inputs(directory: Path, manifest: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The stored example inputs plus the manifest's all-zero ones, in input order."""
    inputs = load_file(str(directory / INPUTS))
    for name, spec in manifest.get(ZERO_INPUTS, {}).items():
        dtype = getattr(torch, str(spec.get("dtype")), None)
        if not isinstance(dtype, torch.dtype) or name in inputs:
            raise PeakcError(f"artifact {directory}: bad {ZERO_INPUTS} entry '{name}': {spec}")
        inputs[name] = torch.zeros(spec["shape"], dtype=dtype)
    return tuple(t for _, t in sorted(inputs.items(), key=_input_order))


def load_artifact(directory: str | Path) -> LoadedArtifact:
    """Open an artifact after checking its format version and every file's checksum."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("partition"):  # one program per pipeline stage: peakc/runtime/pipeline.py
        raise PeakcError(
            f"artifact {directory} holds pipeline stages: run it with `peakc launch {directory} "
            f"--nproc-per-node {manifest['partition']['world_size']}`"
        )
    verify_files(directory, manifest)
    for ns in manifest.get("ops", []):
        if not _namespace_registered(ns):
            raise PeakcError(
                f"artifact {directory} uses ops of namespace '{ns}', which is not registered "
                "(load the plug-in that defines them)"
            )
    return LoadedArtifact(directory, manifest)


def _named_dims(signature: dict[str, Any], symbols: dict[str, str]) -> dict[str, Any]:
    """Replace symbolic sizes ("s27") in a signature by the dynamic dims' names ("seq")."""
    shape = signature["shape"]
    signature["shape"] = [symbols.get(d, d) if isinstance(d, str) else d for d in shape]
    return signature


def _load_exported(path: Path) -> torch.export.ExportedProgram:
    with zipfile.ZipFile(path) as archive:
        for item in archive.infolist():
            entry = item.filename
            inner = entry.split("/", 1)[1] if "/" in entry else entry
            if inner in _ARCHIVE_ALLOWED or (
                inner.startswith("models/") and inner.endswith(".json")
            ):
                continue
            if inner.startswith("data/sample_inputs/") and item.file_size == 0:
                continue
            raise PeakcError(
                f"{path.name}: refusing archive entry '{entry}' (could hold pickled data)"
            )
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise PeakcError(f"{path.name} could not be loaded: {_first_line(exc)}") from exc


def _load_program(path: Path) -> Callable:
    """The program's graph module, called with (*weights, *inputs) and returning a tuple.

    The raw graph module skips ExportedProgram.module()'s per-call pytree and guard checks
    (several ms per call); LoadedArtifact.check_inputs validates inputs against the manifest.
    """
    return _load_exported(path).graph_module


register_program_format("torch.export", lambda path, runtime: _load_program(path))


def _custom_namespaces(contents: ArtifactContents) -> set[str]:
    names = set()
    for data, _ in contents.programs.values():
        text = data.decode("latin-1")
        for ns in ("peakc",):
            if f'"{ns}.' in text or f"{ns}::" in text:
                names.add(ns)
    return names


def _namespace_registered(ns: str) -> bool:
    if ns == "peakc":
        import peakc.ir.ops  # noqa: F401

        return True
    return hasattr(torch.ops, ns) and bool(dir(getattr(torch.ops, ns)))


def _all_zero(t: torch.Tensor) -> bool:
    """Every element is 0 (for floats +0.0 only, so rebuilding with torch.zeros is exact)."""
    if t.is_complex():
        return False
    if t.is_floating_point() and torch.signbit(t).any():
        return False
    return not t.any()


def _input_order(item: tuple[str, torch.Tensor]) -> int:
    return int(item[0].rsplit("_", 1)[1])


def _contiguous(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in weights.items():
        t = t.detach().contiguous()
        key = t.untyped_storage().data_ptr() if t.numel() else -1
        # safetensors refuses shared storage: tied weights are written as separate copies.
        out[name] = t.clone() if key in seen else t
        if key != -1:
            seen[key] = name
    return out


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 folders and safetensors 0600 files; artifacts are shared read-only."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["ArtifactContents", "LoadedArtifact", "load_artifact", "write_artifact"]

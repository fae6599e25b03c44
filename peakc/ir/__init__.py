"""The IR: captured FX graphs, their metadata, blocks, and the peakc op set."""

from peakc.ir.capture import capture
from peakc.ir.graph import Block, Graph

__all__ = ["Block", "Graph", "capture"]

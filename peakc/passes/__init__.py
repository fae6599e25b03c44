"""Passes: the pipeline of graph rewrites between capture and lowering."""

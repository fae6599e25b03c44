"""Backends lower a transformed Graph into an Artifact."""

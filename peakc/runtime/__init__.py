"""Runtime: artifacts on disk, loading them, and running them."""

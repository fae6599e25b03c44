"""Hardware cost model: profiles, per-node estimates, calibration."""

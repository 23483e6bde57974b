"""Release policy, the gate and robustness grids."""

"""User data for anything that runs a model: data sets, calibration, fidelity and accuracy."""

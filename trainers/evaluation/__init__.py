"""Evaluation: accuracy on holdouts and public benchmarks, and calibration."""

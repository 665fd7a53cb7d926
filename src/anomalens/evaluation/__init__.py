"""Measuring detectors: metrics, benchmark tables, speed runs, memory and machine profiling."""

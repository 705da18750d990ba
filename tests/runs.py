"""Helpers for the end-to-end tests of the domain scripts."""
import json

TIMING_KEYS = {"wall_seconds", "latency", "train_seconds", "sec_per_step", "peak_mem_gb", "mem_start_gb"}


def metrics_without_timings(path) -> dict:
    """metrics.json without wall-clock numbers: two identical runs must agree on the rest."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMING_KEYS}
        return v
    return strip(json.load(open(path)))

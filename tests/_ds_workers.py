"""Moved to :mod:`benchmarks.scenarios.deepspeed` (shared with the benchmarks); this name stays for the tests."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("benchmarks.scenarios.deepspeed")

"""Moved to :mod:`dist_muonclip.integrations.compat`; this documented import path keeps working (it is the same module)."""
import importlib
import sys

_module = importlib.import_module("dist_muonclip.integrations.compat")
sys.modules[__name__] = _module

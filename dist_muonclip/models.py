"""Moved to :mod:`dist_muonclip.support.models`; this documented import path keeps working (it is the same module)."""
import importlib
import sys

_module = importlib.import_module("dist_muonclip.support.models")
sys.modules[__name__] = _module

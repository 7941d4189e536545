"""Moved to :mod:`dist_muonclip.integrations.hf`; ``import dist_muonclip.hf`` installs its hooks (it is the same module)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("dist_muonclip.integrations.hf")

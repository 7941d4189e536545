"""Moved to :mod:`dist_muonclip.integrations.launch_env`; this documented import path keeps working (it is the same module)."""
import importlib
import sys

_module = importlib.import_module("dist_muonclip.integrations.launch_env")
if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module

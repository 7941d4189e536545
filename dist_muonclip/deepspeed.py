"""Moved to :mod:`dist_muonclip.integrations.deepspeed`; this documented import path keeps working (it is the same module).

``python -m dist_muonclip.deepspeed ...`` runs the tiny DeepSpeed trainer, which lives outside the
library in :mod:`dist_muonclip.support.ds_trainer`.
"""
import importlib
import sys

if __name__ == "__main__":
    importlib.import_module("dist_muonclip.support.ds_trainer").main()
else:
    sys.modules[__name__] = importlib.import_module("dist_muonclip.integrations.deepspeed")

"""The engine parts behind :class:`~dist_muonclip.optimizer.MuonClip` (see :mod:`.engine`).

* :mod:`.units`: the parameter registry and the Muon units (parameters, chunks of experts)
* :mod:`.exchange`: how a bucket reaches its owner and the updates come back, one per layout
* :mod:`.grads`, :mod:`.reduction`: where the reduced gradient lives (external / sharded /
  optimizer-owned reduction)
* :mod:`.adamw`: the AdamW part; :mod:`.preflight`: the step's one all-reduce and the clip
* :mod:`.checkpoint`: the name-keyed state format
* :mod:`.engine`: the pipeline that ties them together
"""
from __future__ import annotations

from .checkpoint import STATE_FORMAT, StateFormat, merge_states
from .engine import Engine, EngineOptions
from .exchange import FROM_OWNER, TO_OWNER, BucketJob, Exchange, ReplicatedExchange, ShardedExchange
from .units import ParamRegistry, Units

__all__ = ["Engine", "EngineOptions", "ParamRegistry", "Units", "Exchange", "ReplicatedExchange", "ShardedExchange",
           "BucketJob", "TO_OWNER", "FROM_OWNER", "StateFormat", "STATE_FORMAT", "merge_states"]

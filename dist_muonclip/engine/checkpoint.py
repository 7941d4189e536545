"""The checkpoint format: optimizer state keyed by parameter name, as flat pieces of full tensors.

Every rank describes what it holds as ``{name: {"step"?: t, "pieces": [(start, stop, {key: 1-D})]}}``
(flat element ranges of the full parameter), so shards from any layout and world size merge into
the full state (:func:`merge_states`), and full state splits into what any rank keeps under any
plan (:meth:`StateFormat.from_full`). The full state is identical to a single-process run's.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .adamw import AdamWPart
from .units import Units

__all__ = ["STATE_FORMAT", "StateFormat", "merge_states"]

STATE_FORMAT = "dist_muonclip.v1"


def merge_states(shards: Sequence[dict[str, dict[str, Any]]], full_shape: Callable[[str], torch.Size]
                 ) -> dict[str, dict[str, Any]]:
    """Assemble full per-parameter state (CPU tensors) from every rank's pieces."""
    pieces: dict[str, list] = defaultdict(list)
    steps: dict[str, Tensor] = {}
    for shard in shards:
        for name, s in shard.items():
            pieces[name].extend(s["pieces"])
            if "step" in s:
                steps[name] = s["step"]
    state: dict[str, dict[str, Any]] = {}
    for name, plist in pieces.items():
        plist = sorted(plist, key=lambda t: t[0])
        shape = full_shape(name)
        entry: dict[str, Any] = {}
        if name in steps:
            entry["step"] = steps[name].detach().cpu().clone()
        for key in plist[0][2]:
            entry[key] = torch.cat([t[2][key].detach().cpu() for t in plist]).view(shape)
        state[name] = entry
    return state


class StateFormat:
    """This rank's state <-> the name-keyed piece format (module doc)."""

    def __init__(self, units: Units, param_groups: Sequence[dict], state: dict, adamw: AdamWPart,
                 owner_of: dict[Tensor, int], *, rank: int, adamw_fused: bool | None) -> None:
        self.units = units
        self.param_groups = param_groups
        self.state = state
        self.adamw = adamw
        self.owner_of = owner_of
        self.rank = rank
        self.adamw_fused = adamw_fused

    def full_shape(self, name: str) -> torch.Size:
        return self.units.layout.full_shape(self.units.by_name[name])

    def local(self) -> dict[str, dict[str, Any]]:
        """This rank's state as pieces (no communication)."""
        out: dict[str, dict[str, Any]] = {}
        units, names, sharded = self.units, self.units.registry.names, self.units.layout.sharded

        def add(name: str, start: int, stop: int, s: dict[str, Any]) -> None:
            entry = out.setdefault(name, {"pieces": []})
            if "step" in s:
                entry["step"] = s["step"]
            entry["pieces"].append((start, stop, {k: v.reshape(-1) for k, v in s.items()
                                                  if isinstance(v, Tensor) and k != "step"}))

        for g in self.param_groups:
            for p in g["params"]:
                for t in units.chunks_of.get(p, ()):   # chunks of a stacked parameter: their owners
                    s = self.state.get(t)
                    if s:
                        c, per = units.chunks[t], t[0].numel()
                        add(names[p], c.start * per, c.stop * per, s)
                s = self.state.get(p)
                if not s:
                    continue
                if sharded:
                    off = 0
                    for a, b in units.layout.ranges(p)[self.rank]:
                        add(names[p], a, b, {k: (v.reshape(-1)[off:off + b - a] if k != "step" else v)
                                             for k, v in s.items()})
                        off += b - a
                elif g["use_muon"]:
                    add(names[p], 0, p.numel(), s)     # the owner holds the whole momentum buffer
        if not sharded:
            by_name = units.by_name
            for part in self.adamw.partitions:
                for seg in part.mine:
                    s = self.state.get(by_name[seg.name])
                    if s:
                        add(seg.name, seg.start, seg.stop, s)
        return out

    def merge(self, shards: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        return merge_states(shards, self.full_shape)

    def from_local(self, local: dict[str, dict[str, Any]]) -> dict[Tensor, dict[str, Any]]:
        """This rank's own pieces back into state (same plan and layout: pickling)."""
        full: dict[str, dict[str, Any]] = {}
        for name, entry in local.items():
            shape = self.full_shape(name)
            out: dict[str, Any] = {}
            if "step" in entry:
                out["step"] = entry["step"]
            for a, b, tensors in entry["pieces"]:
                for k, v in tensors.items():
                    if k not in out:
                        out[k] = torch.zeros(shape, dtype=v.dtype, device=v.device)
                    out[k].view(-1)[a:b] = v
            full[name] = out
        return self.from_full(full)

    def from_full(self, full: dict[str, dict[str, Any]], only: set | None = None) -> dict[Tensor, dict[str, Any]]:
        """Of full per-parameter state (name -> {key: full tensor}), what this rank keeps under the
        current plan and layout: owners' momentum (whole, or per chunk of experts), AdamW slices,
        sharded pieces. ``only``: just these parameters."""
        units, names, sharded = self.units, self.units.registry.names, self.units.layout.sharded
        new_state: dict[Tensor, dict[str, Any]] = {}

        def take(p: Tensor, s: dict[str, Any], ranges: list[tuple[int, int]], whole: bool) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in s.items():
                if not isinstance(v, Tensor):
                    out[k] = v
                elif k == "step":
                    out[k] = v.detach().to(torch.float32).clone().to(p.device if self.adamw_fused else "cpu")
                else:
                    local = units.layout.local_param(p)   # sharded: fp32 master pieces of a bf16 param
                    v = v.detach().to(dtype=local.dtype if sharded else p.dtype, device=local.device)
                    pieces = [v.reshape(-1)[a:b] for a, b in ranges if b > a]
                    out[k] = v.clone() if whole else (torch.cat(pieces) if pieces else v.reshape(-1)[:0]).clone()
            return out

        for g in self.param_groups:
            for p in g["params"]:
                name = names[p]
                if name not in full or (only is not None and p not in only):
                    continue
                if sharded:
                    new_state[p] = take(p, full[name], units.layout.ranges(p)[self.rank], whole=False)
                elif p in units.chunks_of:
                    for t in units.chunks_of[p]:
                        if self.owner_of[t] == self.rank:
                            c, per = units.chunks[t], t[0].numel()
                            st = take(p, full[name], [(c.start * per, c.stop * per)], whole=False)
                            new_state[t] = {k: (v.view(t.shape) if isinstance(v, Tensor) and k != "step" else v)
                                            for k, v in st.items()}
                elif g["use_muon"] and self.owner_of[p] == self.rank:
                    new_state[p] = take(p, full[name], [(0, p.numel())], whole=True)
        if not sharded:
            by_name = units.by_name
            for part in self.adamw.partitions:
                for seg in part.mine:
                    p = by_name[seg.name]
                    if seg.name in full and (only is None or p in only):
                        whole = seg.start == 0 and seg.stop == p.numel()
                        new_state[p] = take(p, full[seg.name], [(seg.start, seg.stop)], whole)
        return new_state

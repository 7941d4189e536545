"""Float64 references of the two seed repositories' optimizers (the oracles of tests/test_compat.py).

Written for these tests from reading the seeds' code (GAD-cell/muon-clip ``src/muon.py``,
``src/utils_muon/utils.py``; axion66/efficient-muonclip ``muon.py``, ``qk_clip.py``, ``muonclip.py``)
and the papers behind them; nothing is copied. Same public API as the seeds (so an example
script runs against it with only its import line changed), but every update is computed in
float64 from the fp32 (or bf16) parameters and written back once per step:

seed 000 (per hidden matrix W, m x n, gradient G; Adam for every tensor that is not 2-D):
    B <- B + (1 - mu) (G - B);  V = G + mu (B - G)                (nesterov, EMA form)
    X = V (transposed if m > n) / (||V||_F + 1e-7);  5 x quintic (3.4445, -4.7750, 2.0315)
    W <- W (1 - lr wd) - lr * 0.4 sqrt(max(m, n)) * X             ("rms aligned", arXiv 2502.16982)
    Adam: m1, m2 EMAs; W <- W (1 - lr wd) - lr (m1 / (1 - b1^t)) / (sqrt(m2 / (1 - b2^t)) + eps)

seed 001 (Muon on ``params``, Keller Jordan's scale; QK-Clip after it):
    W <- W (1 - lr wd) - lr sqrt(max(1, m / n)) * NS(V)            (NS as above)
    gamma_h = min(1, tau / (s_h + 1e-6));  W_q, W_k rows of head h *= gamma_h^alpha   (MHA)
    MLA: W_qc, W_kc rows *= gamma_h^alpha, W_qr rows *= gamma_h

Seed 000's QK-Clip (logits recomputed after the update from the q_proj inputs, divided by
head_dim) is a documented difference (docs/compat.md) and is not modelled: callers assert that
the max logits stay far below the threshold, where neither side clips. Seed 001's ``metadata``
names an ``nn.Linear`` in its README (its code asserted an ``nn.Parameter``); here it names a Linear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns64(v: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Keller Jordan's quintic Newton-Schulz in float64, normalised by ||V||_F + eps (both seeds)."""
    a, b, c = NS_COEFFS
    x = v.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


class _Muon64:
    """The momentum + NS part shared by both references; state in float64."""

    def __init__(self) -> None:
        self.bufs: dict[Tensor, Tensor] = {}

    def direction(self, p: Tensor, momentum: float, nesterov: bool, ns_steps: int) -> Tensor:
        g = p.grad.double()
        buf = self.bufs.setdefault(p, torch.zeros_like(g))
        buf.add_((1 - momentum) * (g - buf))
        v = g + momentum * (buf - g) if nesterov else buf
        return ns64(v.reshape(v.shape[0], -1), ns_steps).reshape(p.shape)


# --------------------------------------------------------------------------- seed 000
# The seed sends every 2-D tensor to Muon (embeddings and LM head too); ours does not (a
# documented difference). A test comparing the updates sets this to our split, so that both
# sides apply the same rule to each tensor: model -> set of Muon parameters.
MUON_PARAMS = None

@dataclass
class MuonConfig:
    unified_lr: bool = True
    lr: float = 1e-4
    lr_muon: float = 1e-4
    lr_adam: float = 1e-4
    muon_beta: float = 0.95
    muon_decay: float = 0.0
    ns_steps: int = 5
    adam_betas: tuple = (0.9, 0.95)
    adam_decay: float = 0.0
    adam_eps: float = 1e-10
    enable_clipping: bool = True
    clipping_layers_mapping: dict = field(default_factory=lambda: {"q_proj": "q_proj", "k_proj": "k_proj"})
    clipping_threshold: float = 50.0
    clipping_alpha: float = 0.5
    log_max_logits: bool = True
    log_dir: str = "./logs"
    cans_ortho: bool = False
    estimate_lower_bound: bool = False


class MuonClip(torch.optim.Optimizer):
    """Seed 000's ``MuonClip(model, model_config, muon_config)`` (and seed 001's, by arguments)."""

    def __new__(cls, *args, **kwargs):
        if args and isinstance(args[0], nn.Module):
            return super().__new__(cls)
        return Seed001MuonClip(*args, **kwargs)

    def __init__(self, model: nn.Module, model_config=None, muon_config: MuonConfig | None = None) -> None:
        cfg = muon_config or MuonConfig()
        self.cfg = cfg
        lr_muon, lr_adam = (cfg.lr, cfg.lr) if cfg.unified_lr else (cfg.lr_muon, cfg.lr_adam)
        chosen = MUON_PARAMS(model) if MUON_PARAMS is not None else {p for p in model.parameters() if p.ndim == 2}
        muon = [p for p in model.parameters() if p in chosen]
        adam = [p for p in model.parameters() if p not in chosen]
        super().__init__([{"params": adam, "lr": lr_adam, "use_muon": False},
                          {"params": muon, "lr": lr_muon, "use_muon": True}], {})
        self.muon = _Muon64()
        self.adam: dict[Tensor, list] = {}

    @torch.no_grad()
    def step(self, closure=None):
        cfg = self.cfg
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)      # the seed steps every parameter, every step
                w = p.double()
                if group["use_muon"]:
                    o = self.muon.direction(p, cfg.muon_beta, True, cfg.ns_steps)
                    w = w * (1 - lr * cfg.muon_decay) - lr * 0.4 * math.sqrt(max(p.shape)) * o
                else:
                    b1, b2 = cfg.adam_betas
                    st = self.adam.setdefault(p, [torch.zeros_like(w), torch.zeros_like(w), 0])
                    g = p.grad.double()
                    st[0].add_((1 - b1) * (g - st[0]))
                    st[1].add_((1 - b2) * (g * g - st[1]))
                    st[2] += 1
                    u = (st[0] / (1 - b1 ** st[2])) / ((st[1] / (1 - b2 ** st[2])).sqrt() + cfg.adam_eps)
                    w = w * (1 - lr * cfg.adam_decay) - lr * u
                p.copy_(w)


# --------------------------------------------------------------------------- seed 001
class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_steps=5, rank=None,
                 world_size=None) -> None:
        if rank is None or world_size is None:    # the seed's rule
            raise Exception("world_size and rank params required")
        super().__init__(list(params), dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                            nesterov=nesterov, ns_steps=ns_steps))
        self.muon = _Muon64()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                o = self.muon.direction(p, group["momentum"], group["nesterov"], group["ns_steps"])
                m, n = p.shape[-2], p.shape[-1]
                w = p.double() * (1 - group["lr"] * group["weight_decay"])
                p.copy_(w - group["lr"] * math.sqrt(max(1, m / n)) * o)


class QKClip:
    def __init__(self, attention_params, mode, metadata, n_head, tau=100.0, alpha=0.5, rank=None,
                 world_size=None) -> None:
        self.layers, self.mode, self.meta, self.n_head = attention_params, mode.lower(), metadata, n_head
        self.tau, self.alpha = tau, alpha

    @torch.no_grad()
    def step(self, s_max) -> None:
        assert len(s_max) == len(self.layers)
        for layer, heads in zip(self.layers, s_max):
            for h, s in enumerate(heads):
                gamma = min(self.tau / (float(s) + 1e-6), 1.0)
                if self.mode == "mla":
                    scales = {"w_qc": gamma ** self.alpha, "w_kc": gamma ** self.alpha, "w_qr": gamma}
                else:
                    scales = {"w_q": gamma ** self.alpha, "w_k": gamma ** self.alpha}
                for key, f in scales.items():
                    w = getattr(layer, self.meta[key]).weight
                    d = w.shape[0] // self.n_head
                    w[h * d:(h + 1) * d].copy_(w[h * d:(h + 1) * d].double() * f)


class Seed001MuonClip(Muon):
    def __init__(self, params, attention_params, mode, metadata, n_head, lr=0.02, weight_decay=0.01, momentum=0.95,
                 nesterov=True, ns_steps=5, tau=100.0, alpha=0.5, rank=None, world_size=None) -> None:
        super().__init__(params, lr, weight_decay, momentum, nesterov, ns_steps, rank, world_size)
        self.qk_clip = QKClip(attention_params, mode, metadata, n_head, tau, alpha, rank, world_size)

    @torch.no_grad()
    def step(self, s_max):
        super().step()
        self.qk_clip.step(s_max)

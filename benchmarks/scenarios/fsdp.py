"""FSDP2 scenarios run on W gloo processes by test_fsdp (module-level for spawn).

:func:`train_single` and :func:`fsdp_train_worker` also serve ``benchmarks/multi_gpu.py --check``
on GPUs: ``device="cuda"`` builds the mesh on CUDA and puts each rank on ``cuda:LOCAL_RANK``
(default ``None``: CPU, as the tests run).
"""
from __future__ import annotations

import torch
from torch import nn

from dist_muonclip.comm import CommAccountant
from benchmarks.scenarios.tiny_hf import tiny_model

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 96
# Shapes chosen for the layout's corner cases: intermediate_size=93 gives 93-row gate/up matrices
# (uneven at W=2 and W=4); DeepSeek-V3 with 3 routed experts has a 3-row router and [3, ., .]
# expert stacks (rank 3 of 4 holds nothing). Heads split across shards: llama k_proj has 32 rows
# = 2 KV heads of 16, so W=4 gives each rank half a head; MLA with 3 heads has q_b_proj of
# 3 x (16 nope + 8 rope) = 72 rows (W=4: 18 per rank, so heads and their q_C / q_R parts straddle
# ranks) and kv_b_proj of 3 x (16 k_C + 16 v) = 96 rows (W=4: 24 per rank, cutting heads).
MODEL_KW = {"llama": dict(intermediate_size=93),
            "deepseek_v3": dict(intermediate_size=93, n_routed_experts=3, num_attention_heads=3,
                                num_key_value_heads=3)}
# tau below the tiny models' max logits (~0.1 llama, ~0.04-0.06 MLA at init) so QK-Clip rescales
# heads every step (checked in the test)
QK = {"llama": dict(tau=0.09), "deepseek_v3": dict(tau=0.04),
      # GPT-2's fused c_attn (a transposed Conv1D): max logits 0.07-0.10 at init, most heads clip
      "gpt2": dict(tau=0.07)}
OPT_KW = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, ns_dtype="float32", ns_backend="torch")


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(2000 + step))


def local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return global_batch(step)[rank * per:(rank + 1) * per]


def _rank_device(device):
    from benchmarks.scenarios.ddp import rank_device

    return rank_device(device)


def build_model(kind: str) -> nn.Module:
    if kind == "gpt2":        # fused QKV: QK-Clip scales c_attn columns on FSDP2 row shards
        import transformers

        cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2, attn_implementation="eager")
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg)
    return tiny_model(kind, seed=0, **MODEL_KW[kind])


def train_single(kind: str, steps: int, start: int = 0, model=None, opt=None, device=None):
    """The oracle: one process (no process group), the whole global batch, same hyperparameters."""
    from dist_muonclip import MuonClip

    if model is None:
        model = build_model(kind)
        if device is not None:
            model.to(device)
        opt = MuonClip(model, qk_clip=QK[kind], **OPT_KW)
    dev = next(model.parameters()).device
    clipped = []
    for t in range(start, start + steps):
        ids = global_batch(t).to(dev)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    return model, opt, clipped


def train_single_mixed_precision(kind: str, steps: int, world: int):
    """Oracle for FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) in one process:
    fp32 master parameters and MuonClip; each step the parameters are cast to bf16 (buffers stay
    fp32, as FSDP2 casts parameters only), each of the ``world`` micro-batches runs forward and
    backward in bf16, the bf16 gradients are cast to fp32 and averaged (FSDP2's fp32
    reduce-scatter), and the max logits of the bf16 forward passes are handed to step(s_max=...)."""
    from dist_muonclip import MuonClip
    from dist_muonclip.qk_clip import QKClipper

    master = build_model(kind)
    opt = MuonClip(master, qk_clip=QK[kind], **OPT_KW)
    low = build_model(kind)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    tracker = QKClipper(low, dict(QK[kind]))
    pairs = list(zip(master.parameters(), low.parameters()))
    for t in range(steps):
        with torch.no_grad():
            for p, q in pairs:
                q.copy_(p)
        acc = [torch.zeros_like(p) for p, _ in pairs]
        for r in range(world):
            ids = local_batch(t, r, world)
            low(input_ids=ids, labels=ids).loss.backward()
            for a, (_, q) in zip(acc, pairs):
                if q.grad is not None:
                    a.add_(q.grad.float())
            low.zero_grad(set_to_none=True)
        for a, (p, _) in zip(acc, pairs):
            p.grad = a.div_(world)
        opt.step(s_max=tracker.max_logits())
        opt.zero_grad(set_to_none=True)
    return master


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters for the comparison in the test (full_tensor() only here, never in the engine)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for n, p in model.named_parameters()}


def fsdp_setup(kind: str, world: int, mp: bool = False, accountant=None, device=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from dist_muonclip import fsdp

    dev = _rank_device(device)
    mesh = init_device_mesh(dev.type if dev is not None else "cpu", (world,))
    model = build_model(kind)
    if dev is not None:
        model.to(dev)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else None
    fsdp.fully_shard_model(model, mesh, policy)
    opt = fsdp.make_muonclip(model, qk_clip=QK[kind], accountant=accountant, **OPT_KW)
    return model, opt


def _state_dicts(model, opt, api: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from dist_muonclip import fsdp

    if api == "torch":     # torch.distributed.checkpoint.state_dict, through MuonClip.state_dict()
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd}
    return {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}


def fsdp_train_worker(rank: int, world: int, kind: str, steps: int, mp: bool = False, save_dir: str | None = None,
                      load_dir: str | None = None, start: int = 0, api: str = "fsdp", full: dict | None = None,
                      device: str | None = None):
    """Train a fully_shard'ed tiny HF model with MuonClip; optionally DCP-save at the end / load first
    (``api``: "fsdp" = dist_muonclip.fsdp's state functions, "torch" = torch's get/set_state_dict).
    ``device="cuda"``: CUDA mesh, this rank's GPU; parameters are returned on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from dist_muonclip import fsdp

    acc = CommAccountant()
    model, opt = fsdp_setup(kind, world, mp, acc, device)
    dev = _rank_device(device)
    if load_dir is not None:
        sd = _state_dicts(model, opt, api)
        dcp.load(sd, checkpoint_id=load_dir)
        if api == "torch":
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            set_model_state_dict(model, sd["model"])
            fsdp.set_optimizer_state_dict(model, opt, sd["optim"])
    if full is not None:          # a full (name-keyed) checkpoint of a one-process / DDP run
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        set_model_state_dict(model, full["model"], options=StateDictOptions(full_state_dict=True))
        opt.load_state_dict(full["optim"])
    acc.reset()
    losses, clipped = [], []
    for t in range(start, start + steps):
        ids = local_batch(t, rank, world)
        if dev is not None:
            ids = ids.to(dev)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    out = {"params": _full_params(model), "acc": acc.totals(), "num_steps": len(acc.steps), "clipped": clipped,
           "losses": losses,
           "param_dtypes": {n: p.dtype for n, p in model.named_parameters()},
           "state_dtypes": {k: v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"},
           "state_numel": sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step"),
           # ZeRO: momentum for local Muon rows, exp_avg + exp_avg_sq for local AdamW rows
           "expected_state_numel": sum(p._local_tensor.numel() * (1 if g["use_muon"] else 2)
                                       for g in opt.param_groups for p in g["params"])}
    if save_dir is not None:
        dcp.save(_state_dicts(model, opt, api), checkpoint_id=save_dir)
    return out


class Toy(nn.Module):
    """Odd shapes for the layout: 7 rows (uneven at W=2, 4), 3 rows (more ranks than rows at W=4),
    a 3-D stack of 3 matrices sharded on its stack dim, a 3-element bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 7)
        self.b = nn.Linear(7, 3)
        self.stack = nn.Parameter(torch.randn(3, 5, 4) * 0.3)
        self.out = nn.Linear(3, 12, bias=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        z = torch.einsum("bi,kij->bkj", x[:, :5], self.stack).sum(1).mean()
        return self.out(h).square().mean() + z


def toy_batch(step: int) -> torch.Tensor:
    return torch.randn(8, 12, generator=torch.Generator().manual_seed(50 + step))


def layout_worker(rank: int, world: int):
    """Shard0Layout against the DTensor's real data: ranges, local views (and writes through them),
    reduced gradients; plus the engine's own tiling validation."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_muonclip import fsdp

    mesh = init_device_mesh("cpu", (world,))
    ref = Toy()
    model = Toy()
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    fsdp.fully_shard_model(model, mesh, blocks=[model.a, model.b])
    layout = fsdp.Shard0Layout()
    names = {p: n for n, p in model.named_parameters()}
    layout.validate(list(names), names, world, rank)
    per = 8 // world
    model(toy_batch(0)[rank * per:(rank + 1) * per]).backward()
    ref(toy_batch(0)).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    out = {}
    for p, n in names.items():
        ranges = layout.ranges(p)
        ((a, b),) = ranges[rank]
        local = layout.local_param(p)
        grad = layout.local_grad(p)
        out[n] = {"ranges": ranges, "local_ok": torch.equal(local, full[n].reshape(-1)[a:b]),
                  "grad_err": (grad - ref_grads[n].reshape(-1)[a:b]).abs().max().item() if grad.numel() else 0.0,
                  "numel": local.numel()}
    # a write through the local view reaches FSDP2's storage: the next full_tensor() shows it
    with torch.no_grad():
        for p in names:
            layout.local_param(p).add_(1.0)
    out["write_ok"] = all(torch.equal(p.full_tensor(), full[n] + 1.0) for p, n in names.items())
    return out


def placement_error_worker(rank: int, world: int):
    """Unsupported DTensor placements must fail at construction with the parameter's name."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from dist_muonclip import MuonClip, fsdp
    from dist_muonclip.layouts import Replicated

    errors = {}
    mesh = init_device_mesh("cpu", (world,))

    def attempt(label, model, layout=None):
        try:
            MuonClip(model, lr=0.01, layout=layout or fsdp.Shard0Layout(), process_group=mesh.get_group())
            errors[label] = None
        except (ValueError, TypeError) as e:
            errors[label] = f"{type(e).__name__}: {e}"

    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    m[1].weight = nn.Parameter(distribute_tensor(m[1].weight.detach(), mesh, [Shard(1)]))
    m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(0)]))
    attempt("shard1", m)
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(0)]))
    m[1].weight = nn.Parameter(distribute_tensor(m[1].weight.detach(), mesh, [Replicate()]))
    attempt("replicate", m)
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(0)]))
    attempt("plain", m)
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    fsdp.fully_shard_model(m, mesh, blocks=[])
    # a fully_shard'ed model without a layout: read from the DTensors (no error any more)
    errors["no_layout"] = type(MuonClip(m, lr=0.01).layout).__name__
    try:                                  # an explicit Replicated layout still refuses DTensors, by name
        MuonClip(m, lr=0.01, layout=Replicated(world))
        errors["replicated"] = None
    except ValueError as e:
        errors["replicated"] = f"{type(e).__name__}: {e}"
    # add_param_group after construction: the same placement checks, and eager state for DCP
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    fsdp.fully_shard_model(m, mesh, blocks=[])
    opt = fsdp.make_muonclip(m, lr=0.01)
    num_groups = len(opt.param_groups)

    def add(label, p, **kw):
        try:
            opt.add_param_group({"params": [(f"extra.{label}", p)], **kw})
            errors[f"add_{label}"] = None
        except (ValueError, TypeError) as e:
            errors[f"add_{label}"] = f"{type(e).__name__}: {e}"

    add("shard1", nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)])))
    add("plain", nn.Parameter(torch.randn(8, 8)))
    added = {"groups_unchanged_by_errors": len(opt.param_groups) == num_groups}
    w = nn.Parameter(distribute_tensor(torch.randn(5, 8), mesh, [Shard(0)]))
    v = nn.Parameter(distribute_tensor(torch.randn(5), mesh, [Shard(0)]))
    opt.add_param_group({"params": [("extra.w", w)]})
    opt.add_param_group({"params": [("extra.v", v)], "use_muon": False})
    added["w"] = {k: tuple(t.shape) for k, t in opt.state[w].items()}
    added["v"] = {k: tuple(t.shape) for k, t in opt.state[v].items()}
    added["dcp_keys"] = sorted(fsdp.get_optimizer_state_dict(m, opt)["state"])
    errors["added"] = added
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        m = nn.Sequential(nn.Linear(8, 8, bias=False))
        m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh2, [Shard(0), Shard(1)]))
        attempt("mesh2d", m)
    return errors


def engine_worker(rank: int, world: int, steps: int, max_norm: float, ckpt: str | None = None):
    """launch/engines_fsdp.FSDPEngine as train.py drives it: shard, MuonClip with the engine's
    optimizer kwargs, clip the global gradient norm on shards, step; then a DCP checkpoint."""
    from types import SimpleNamespace

    from dist_muonclip import MuonClip
    from launch.engines_fsdp import FSDPEngine

    ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"))
    model = build_model("llama")
    engine = FSDPEngine(model, ctx)
    opt = MuonClip(engine.module, qk_clip=QK["llama"], **OPT_KW, **engine.optimizer_kwargs())
    norms = []
    for t in range(steps):
        ids = local_batch(t, rank, world)
        engine.model(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(engine.clip_grad_norm_(max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": _full_params(engine.module), "norms": norms}
    if ckpt is not None:
        out["path"] = str(engine.save_checkpoint(ckpt, step=steps, optimizer=opt, extra={"note": "x"}))
        # reload into a fresh model + optimizer on the same ranks: identical state
        model2 = tiny_model("llama", seed=5, **MODEL_KW["llama"])   # different init: all from the checkpoint
        engine2 = FSDPEngine(model2, ctx)
        opt2 = MuonClip(engine2.module, qk_clip=QK["llama"], **OPT_KW, **engine2.optimizer_kwargs())
        got = engine2.load_checkpoint(out["path"], optimizer=opt2, extra={"note": ""})
        out["loaded_step"], out["loaded_extra"] = got["step"], got["extra"]
        out["reloaded_params"] = _full_params(engine2.module)
        out["state_equal"] = all(
            torch.equal(opt.state[p][k], opt2.state[q][k])
            for p, q in zip(engine.module.parameters(), engine2.module.parameters()) for k in opt.state[p])
    return out



def calls_worker(rank: int, world: int, calls: list[tuple[str, tuple]]):
    """Several scenarios of this module in one process group, in order: ``calls`` = [(function
    name, args)]. One spawn per world size instead of one per scenario: process start-up (torch +
    transformers imports) dominates these tiny runs on a shared 2-core CI machine."""
    return [globals()[name](rank, world, *args) for name, args in calls]


def optimizer_clip_worker(rank: int, world: int, steps: int, max_norm: float):
    """MuonClip(max_grad_norm=...) on a fully_shard'ed model: the optimizer clips the global
    norm of the reduce-scattered gradient from the local rows (one scalar all-reduce)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_muonclip import fsdp

    model = fsdp.fully_shard_model(build_model("llama"), init_device_mesh("cpu", (world,)))
    opt = fsdp.make_muonclip(model, qk_clip=QK["llama"], max_grad_norm=max_norm, **OPT_KW)
    norms = []
    for t in range(steps):
        ids = local_batch(t, rank, world)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        norms.append(opt.metrics()["grad_norm"])
    return {"params": _full_params(model), "norms": norms}


def dcp_train_steps(model, opt, acc, batch, start: int, steps: int, *, load_dir: str | None = None,
                    save_dir: str | None = None) -> list[float]:
    """Steps ``start .. start+steps-1`` on ``batch(t)`` (the heads QK-Clip clipped per step
    returned), with the model and optimizer state loaded from the DCP checkpoint ``load_dir``
    before and saved to ``save_dir`` after (keyed by FQN: the mesh may differ between the two);
    the accountant counts only the steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from dist_muonclip import fsdp

    if load_dir is not None:
        sd = {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=load_dir)
        set_model_state_dict(model, sd["model"])
        fsdp.set_optimizer_state_dict(model, opt, sd["optim"])
    acc.reset()
    clipped = []
    for t in range(start, start + steps):
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    if save_dir is not None:
        dcp.save({"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)},
                 checkpoint_id=save_dir)
    return clipped


def mesh_train_worker(rank: int, world: int, kind: str, steps: int, mesh_shape: tuple, how: str = "auto",
                      save_dir: str | None = None, load_dir: str | None = None, start: int = 0,
                      extra: dict | None = None):
    """fully_shard on a 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP) mesh, then MuonClip:
    ``how="auto"``: ``MuonClip(model, ...)`` reads the layout from the DTensors (no layout, no
    process group given); ``"make"``: ``fsdp.make_muonclip``. Optional DCP save / load (the mesh
    shape may differ between the two: the checkpoint is keyed by FQN, sharded like the params)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_muonclip import MuonClip, fsdp

    names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")
    mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=names)
    model = fsdp.fully_shard_model(build_model(kind), mesh)
    acc = CommAccountant()
    kw = {**OPT_KW, **(extra or {})}
    if how == "auto":
        opt = MuonClip(model, qk_clip=QK[kind], accountant=acc, **kw)
    else:
        opt = fsdp.make_muonclip(model, qk_clip=QK[kind], accountant=acc, **kw)
    clipped = dcp_train_steps(model, opt, acc, lambda t: local_batch(t, rank, world), start, steps,
                              load_dir=load_dir, save_dir=save_dir)
    return {"params": _full_params(model), "clipped": clipped, "acc": acc.totals(),
            "layout": type(opt.layout).__name__, "opt_world": opt.world_size, "opt_rank": opt.rank,
            "coord": tuple(mesh.get_coordinate()),
            "local_params": {n: p._local_tensor.detach().clone() for n, p in model.named_parameters()},
            "local_state": {(opt.param_name(p), k): v.clone() for p, s in opt.state.items()
                            for k, v in s.items()},
            "state_numel": sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step"),
            "expected_state_numel": sum(p._local_tensor.numel() * (1 if g["use_muon"] else 2)
                                        for g in opt.param_groups for p in g["params"])}

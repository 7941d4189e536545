#!/usr/bin/env python
"""Train a small Hugging Face causal LM with MuonClip or AdamW, single process or under torchrun.

    python launch/train.py --steps 200                                   # MuonClip, llama-gqa, CPU
    python launch/train.py --optimizer adamw --steps 200
    torchrun --nproc_per_node=2 --master_port=29531 launch/train.py --steps 20

The model is built from a JSON preset (``configs/models``; no download) and trained on the
byte-level corpus shipped in ``dist_muonclip/data`` (vocabulary 256). The global batch of step
``t`` is identical for every world size (:func:`dist_muonclip.data.batch_for_step`): each rank
takes its contiguous slice, so a W-rank run can be compared with the single-process run.

Engines (``--engine``) wrap the model and own gradient reduction: ``ddp`` (no wrapper when the
world size is 1; with ``--grad-reduction optimizer`` the model is not wrapped and MuonClip
reduce-scatters gradients to their owner ranks itself), ``fsdp`` (FSDP2, ``--fsdp``) and
``deepspeed`` (``--deepspeed_config ds.json``, also under the ``deepspeed`` launcher; see
``launch/engines_deepspeed.py``). An engine is a class in :data:`ENGINES` taking
``(model, ctx, grad_reduction=...)`` with ``.model`` for the forward and ``clip_grad_norm_`` (or
``backward_step``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    # Run as a script (python launch/train.py / torchrun launch/train.py): make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_muonclip.comm import comm_tag
from dist_muonclip.launch_env import leave_process_group
from launch import checkpoint_files as ckpt_files
from dist_muonclip.data import VOCAB_SIZE, batch_for_step, eval_batches, load_corpus, split_corpus
from dist_muonclip.models import DEFAULT_PRESET, build_model, load_model_config, parse_override

__all__ = [
    "DEFAULTS",
    "ENGINES",
    "build_parser",
    "parse_args",
    "lr_factor",
    "build_optimizer",
    "format_grad_norm",
    "train",
    "main",
]

# Documented defaults, chosen by the sweep in benchmarks/results/train_defaults_cpu.json
# (llama-gqa preset, 200 steps, global batch 16 x 128 bytes, CPU).
DEFAULTS: dict[str, dict[str, float]] = {
    # lr: Muon lr with the "match_rms_adamw" update scale (0.2 * sqrt(max(m, n))), so AdamW-like
    # values apply (Moonlight, arXiv 2502.16982); adamw_lr: lr of MuonClip's AdamW part.
    "muonclip": {"lr": 1e-2, "adamw_lr": 3e-3},
    "adamw": {"lr": 1e-3},
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _ns_coefficients(text: str) -> Any:
    """``jordan`` / ``polar_express`` / ``cans`` or a JSON triple / list of triples."""
    text = text.strip()
    if text[:1] in "[(":
        try:
            value = json.loads(text.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--ns-coefficients {text!r} is not valid JSON: {exc}") from exc
        if value and all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
        return [tuple(float(c) for c in row) for row in value]
    return text


class _HelpFormatter(argparse.HelpFormatter):
    """One default per flag in ``--help``: ``(default: X)`` appended where a flag has a value of its
    own and its help does not show it already; nothing where it has none (``None``, an off switch,
    an empty list), whose help text then says what happens, in the same ``(default: ...)`` form when
    a value is derived after parsing. (argparse's ArgumentDefaultsHelpFormatter printed
    ``(default: None)`` after those.)"""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        no_value = default is None or default is False or default is argparse.SUPPRESS or default == []
        if not action.option_strings or no_value or "%(default)" in text:   # (0 and 0.0 are values)
            return action.help
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"preset name in configs/models (default: {DEFAULT_PRESET})")
    g.add_argument("--model-config", default=None, help="path of a JSON model config (instead of --model)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config key, e.g. --override hidden_size=64 (repeatable)")
    g.add_argument("--attn-implementation", default="sdpa", help="HF attention implementation")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None,
                   help="text file (plain or .gz) (default: the corpus shipped in dist_muonclip/support)")
    g.add_argument("--batch-size", type=int, default=16, help="GLOBAL batch in sequences (divisible by world size)")
    g.add_argument("--seq-len", type=int, default=128, help="sequence length in byte tokens")
    g.add_argument("--eval-batches", type=int, default=8, help="number of fixed held-out batches per evaluation")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=("muonclip", "adamw"), default="muonclip",
                   help="muonclip: Muon on hidden matrices + AdamW on the rest + QK-Clip; adamw: AdamW on all")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (total, also when resuming)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak lr (MuonClip: the Muon lr; AdamW: its lr) (default: "
                   + ", ".join(f"{k} {v['lr']:g}" for k, v in DEFAULTS.items()) + ")")
    g.add_argument("--adamw-lr", type=float, default=None,
                   help="peak lr of MuonClip's AdamW part (embeddings, head, norms, biases) "
                   f"(default: {DEFAULTS['muonclip']['adamw_lr']:g})")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (both optimizers)")
    g.add_argument("--momentum", type=float, default=0.95, help="Muon momentum")
    g.add_argument("--adamw-betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (both optimizers)")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup, then cosine decay to 10%% of peak")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="max global norm of the reduced gradient, clipped before momentum and Newton-Schulz "
                   "(0: off). DDP/FSDP: clip_grad_norm_ after backward; DeepSpeed: the config's "
                   "gradient_clipping if set; --grad-reduction optimizer: inside step() as "
                   "MuonClip(max_grad_norm=...), the only place the reduced gradient exists")
    g.add_argument("--qk-clip-tau", type=float, default=100.0, help="QK-Clip threshold tau (MuonClip)")
    g.add_argument("--no-qk-clip", action="store_true", help="disable QK-Clip")
    g.add_argument("--ns-backend", default="auto", help="Newton-Schulz backend: torch | triton | auto")
    g.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="Newton-Schulz operand dtype (float32: reproducible across reduction orders)")
    g.add_argument("--ns-coefficients", type=_ns_coefficients, default="jordan",
                   help="jordan | polar_express | cans | JSON (a,b,c) or [[a,b,c],...]")
    g.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz iterations")
    g = p.add_argument_group("runtime")
    g.add_argument("--engine", choices=sorted(ENGINES), default="ddp",
                   help="ddp: replicated parameters, DDP gradient all-reduce (no wrapper for 1 process)")
    g.add_argument("--fsdp", dest="engine", action="store_const", const="fsdp", help="= --engine fsdp (FSDP2)")
    g.add_argument("--fsdp-mixed-precision", choices=("none", "bf16"), default="none",
                   help="FSDP2 MixedPrecisionPolicy: bf16 parameters in forward/backward, fp32 gradient reduction")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   metavar="DS.json", help="DeepSpeed JSON config: selects --engine deepspeed (configs/zero*.json)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)   # passed by the deepspeed launcher; LOCAL_RANK is read from the env
    g.add_argument("--grad-reduction", choices=("external", "optimizer"), default="external",
                   help="external: the engine (DDP) all-reduces gradients; optimizer: no DDP, MuonClip "
                   "reduces gradients to their owners during backward (same bytes as DDP; MuonClip only; "
                   "--grad-clip is applied inside step())")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda if available)")
    g.add_argument("--autocast", choices=("none", "bf16"), default="none", help="autocast dtype of forward")
    g.add_argument("--seed", type=int, default=0, help="model init and data order")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10,
                   help="print mean loss, lr, grad norm, tokens/s and max logit per layer every N steps")
    g.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (0: only at the end)")
    g.add_argument("--out", default=None, help="write a JSON with the per-step log and final losses")
    g.add_argument("--save", default=None, help="checkpoint directory (written at the end and every --save-every)")
    g.add_argument("--profile", default=None, metavar="TRACE.json",
                   help="per-step, per-rank profile (phase times, bytes per collective, NS FLOPs, memory) "
                   "to this JSON (+ .csv; rank r>0 writes TRACE.rank<r>.json); summary printed on rank 0")
    g.add_argument("--profile-wire", action=argparse.BooleanOptionalAction, default=True,
                   help="with --profile: count every collective on the wire (the engine's: DDP, FSDP2, DeepSpeed, "
                   "and the optimizer's); --no-profile-wire: only the optimizer's accountant (+ DDP's all-reduce)")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    g.add_argument("--resume", default=None, help="checkpoint file or directory (latest step_*.pt) to resume")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (errors name the flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.optimizer]
    if args.lr is None:
        args.lr = defaults["lr"]
    if args.adamw_lr is None:
        args.adamw_lr = defaults.get("adamw_lr", args.lr)
    if args.grad_reduction == "optimizer":
        if args.optimizer != "muonclip":
            parser.error("--grad-reduction optimizer needs --optimizer muonclip (AdamW relies on DDP's all-reduce)")
    if args.deepspeed_config is not None:
        if args.engine not in ("ddp", "deepspeed"):
            parser.error(f"--deepspeed_config selects the deepspeed engine; it cannot be combined with --engine "
                         f"{args.engine}")
        if not os.path.isfile(args.deepspeed_config):
            parser.error(f"--deepspeed_config {args.deepspeed_config}: no such file")
        args.engine = "deepspeed"
    elif args.engine == "deepspeed":
        parser.error("--engine deepspeed needs --deepspeed_config PATH (e.g. configs/zero1.json)")
    if args.engine == "deepspeed" and args.grad_reduction != "external":
        parser.error("--grad-reduction optimizer does not apply to the deepspeed engine (DeepSpeed reduces gradients)")
    checks = [
        (args.steps >= 1, "--steps must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.seq_len >= 1, "--seq-len must be >= 1"),
        (args.lr > 0 and args.adamw_lr > 0, "--lr and --adamw-lr must be > 0"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (args.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)"),
        (args.qk_clip_tau > 0, "--qk-clip-tau must be > 0"),
        (args.log_every >= 1, "--log-every must be >= 1"),
        (args.eval_every >= 0 and args.save_every >= 0, "--eval-every/--save-every must be >= 0"),
        (args.eval_batches >= 1, "--eval-batches must be >= 1"),
        (args.model is None or args.model_config is None, "pass --model or --model-config, not both"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        args.overrides = dict(parse_override(o) for o in args.override)
    except ValueError as exc:
        parser.error(f"--override: {exc}")
    return args


# --------------------------------------------------------------------------------------------
# Distributed setup and engines
# --------------------------------------------------------------------------------------------

@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None          # None: single process, no process group
    owns_group: bool = False     # True: we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> DistContext:
    """Pick the device (cuda if available unless ``--device``) and the process group.

    An already initialised default group is used as is (and left alive at the end). Otherwise,
    under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` in the environment) the group is initialised
    from env vars: NCCL on GPU, gloo on CPU. Otherwise: single process, no group.
    """
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg not in ("cpu", "cuda"):
        raise ValueError(f"--device {device_arg!r} must be auto, cpu or cuda")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device,
                           dist.get_backend(), owns_group=False)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                **_elastic_store_kwargs())
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend,
                           owns_group=True)
    return DistContext(0, 1, local_rank, device, None)


def _elastic_store_kwargs() -> dict:
    """``init_method="env://"``, except under a torchrun agent that shares its store with the
    workers (c10d rendezvous): there the workers' keys carry no per-restart prefix, so a restarted
    rank could read a dead rank's gloo address left by the previous attempt (connection refused,
    then a hang: seen with DeepSpeed, whose slower start made the race likely). Prefix the keys
    with the restart count."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {"init_method": "env://"}
    import datetime

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"dist_muonclip/attempt_{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def teardown_distributed(ctx: DistContext) -> None:
    """Barrier, then destroy the process group if this script created it."""
    if ctx.owns_group:
        leave_process_group()


class DDPEngine:
    """Replicated parameters. ``grad_reduction="external"``: DDP all-reduces (averages) gradients
    (no wrapper for one process); ``"optimizer"``: no wrapper, MuonClip reduces the gradients."""

    name = "ddp"

    def __init__(self, model: torch.nn.Module, ctx: DistContext, *, grad_reduction: str = "external"):
        self.module = model
        self.ctx = ctx
        self.grad_reduction = grad_reduction
        if ctx.backend is not None and ctx.world_size > 1 and grad_reduction == "external":
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DDP(model, device_ids=device_ids)
        else:
            self.model = model

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor | None:
        """Clip to ``max_norm`` (0: no clipping) and return the global gradient norm; ``None``
        when the optimizer reduces gradients (local gradients are not the global ones yet)."""
        if self.grad_reduction == "optimizer" and self.ctx.world_size > 1:
            return None
        # After DDP's all-reduce every rank holds the same full gradients: the local norm is global.
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


# name -> engine class; later issues add "fsdp" and "deepspeed" here.
ENGINES: dict[str, Callable[..., Any]] = {"ddp": DDPEngine}
from launch.engines_fsdp import FSDPEngine  # noqa: E402
from launch.engines_deepspeed import DeepSpeedEngine  # noqa: E402
ENGINES["fsdp"] = FSDPEngine
ENGINES["deepspeed"] = DeepSpeedEngine


# --------------------------------------------------------------------------------------------
# Optimizer, schedule
# --------------------------------------------------------------------------------------------

def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup over ``warmup_steps`` steps
    (reaching 1 at step ``warmup_steps - 1``), then cosine decay to ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _qk_clip_config(args: argparse.Namespace) -> Any:
    """MuonClip's ``qk_clip`` argument: ``False`` with ``--no-qk-clip``; a config dict with
    ``--qk-clip-tau`` when :mod:`dist_muonclip.qk_clip` imports; else ``None`` (MuonClip's auto
    mode, which is off without that module) and a warning."""
    if args.no_qk_clip:
        return False
    try:
        import dist_muonclip.qk_clip  # noqa: F401
    except ImportError:
        warnings.warn("dist_muonclip.qk_clip is not importable: training MuonClip without QK-Clip",
                      stacklevel=2)
        return None
    return {"enable": True, "tau": args.qk_clip_tau}


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, **extra: Any) -> torch.optim.Optimizer:
    """MuonClip (Muon for hidden matrices, AdamW for the rest, QK-Clip) or plain AdamW.

    ``model`` is the unwrapped module (parameter names are used to split Muon/AdamW parameters).
    AdamW applies weight decay to every parameter, like MuonClip's default, so the comparison is
    between update rules only.
    """
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.adamw_betas),
                                 eps=1e-8, weight_decay=args.weight_decay)
    from dist_muonclip import MuonClip

    return MuonClip(model, lr=args.lr, momentum=args.momentum, nesterov=True,
                    weight_decay=args.weight_decay, ns_steps=args.ns_steps,
                    ns_coefficients=args.ns_coefficients, ns_backend=args.ns_backend,
                    ns_dtype=args.ns_dtype, adamw_lr=args.adamw_lr,
                    adamw_betas=tuple(args.adamw_betas), qk_clip=_qk_clip_config(args),
                    grad_reduction=args.grad_reduction,
                    # optimizer-owned reduction: only step() sees the reduced gradient, so it clips
                    max_grad_norm=(args.grad_clip or None) if args.grad_reduction == "optimizer" else None,
                    **extra)


_LR_KEYS = ("lr", "adamw_lr")  # group keys holding a peak lr that the schedule scales


def _base_lrs(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    return [{k: float(g[k]) for k in _LR_KEYS if isinstance(g.get(k), (int, float))}
            for g in optimizer.param_groups]


def _set_lr(optimizer: torch.optim.Optimizer, base: list[dict[str, float]], factor: float) -> None:
    for group, lrs in zip(optimizer.param_groups, base):
        for key, value in lrs.items():
            group[key] = value * factor


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(directory: str | os.PathLike, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, args: argparse.Namespace, ctx: DistContext) -> Path:
    """Write ``<directory>/step_<step>.pt`` (model, optimizer state, next step, RNG) from rank 0.

    Parameters are replicated under the ddp engine, so rank 0's copy is complete; the optimizer's
    full state dict is gathered on every rank (loadable at any world size). Crash-safe
    (:mod:`launch.checkpoint_files`): written as ``step_<step>.pt.tmp``, fsynced, its SHA-256
    recorded in ``step_<step>.pt.sha256``, then renamed, so a kill mid-save never publishes a
    partial file and a later truncation is detected on resume.
    """
    path = Path(directory) / f"step_{step:07d}.pt"
    # Every rank calls state_dict(): for a sharded optimizer (MuonClip's ZeRO-1 mode) it is a
    # collective that gathers the full state; rank 0 writes it.
    optimizer_state = optimizer.state_dict()
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer_state,
                   "rng": _rng_state(), "args": {k: v for k, v in vars(args).items()},
                   "world_size": ctx.world_size}
        tmp = ckpt_files.clear_tmp(path)
        torch.save(payload, tmp)
        ckpt_files.fault_point("save", step, ctx.rank)
        ckpt_files.publish_file(tmp, path)
    if ctx.backend is not None:
        dist.barrier()
    return path


def resolve_checkpoint(path: str | os.PathLike, *, kind: str = "file") -> Path | None:
    """What ``--resume PATH`` loads: a published checkpoint itself (a ``step_*.pt`` file, or with
    ``kind="dir"`` a ``step_*`` directory), verified against its recorded hashes; or the newest
    complete one inside the directory ``PATH``, skipping corrupt ones with a warning; or None
    when ``PATH`` holds none or does not exist yet (a fresh start: the same command is both the
    first start and the restart). Raises ``ValueError`` naming the file for a corrupt explicit
    checkpoint, or when every checkpoint in the directory is corrupt."""
    return ckpt_files.resolve(path, kind=kind, is_checkpoint=Path.is_file if kind == "file"
                              else lambda p: ckpt_files.step_of(p) is not None and p.is_dir())


def _agree_on_checkpoint(path: Path | None, ctx: DistContext) -> None:
    """Every rank must resume from the same checkpoint (each resolved it from the files it sees:
    on a filesystem that is not shared, or changing under us, they could differ)."""
    if ctx.backend is None or ctx.world_size == 1:
        return
    mine = str(path) if path is not None else ""
    chosen: list[str] = [""] * ctx.world_size
    dist.all_gather_object(chosen, mine)
    if len(set(chosen)) != 1:
        raise RuntimeError(f"--resume: ranks chose different checkpoints {chosen}; the checkpoint directory must be "
                           "the same shared directory on every rank")


def _load_file_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """``torch.load`` naming the file when it cannot be read (no hash recorded: an old file)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ckpt_files.CheckpointCorruptError(f"checkpoint file {path} cannot be loaded: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan (e.g. -inf: a layer with no recorded logit)
    return value


def _optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer's metrics (update RMS, QK-Clip max logits, ...) if it exposes ``metrics()``.

    Per-layer max logits (QK-Clip's ``.../max_logit/layer_NN`` scalars, or a ``max_logits``
    ``[num_layers, num_heads]`` tensor) are gathered into one ``max_logit_per_layer`` list.
    """
    fn = getattr(optimizer, "metrics", None)
    if not callable(fn):
        return None
    metrics = dict(fn())
    per_layer = sorted((k, v) for k, v in metrics.items() if "max_logit/layer_" in k)
    if per_layer:
        for k, _ in per_layer:
            del metrics[k]
        metrics["max_logit_per_layer"] = [v for _, v in per_layer]
    ml = metrics.get("max_logits")
    if isinstance(ml, torch.Tensor) and ml.ndim == 2:
        # [num_layers, max_heads] -> per-layer max (the figure the Kimi K2 paper plots).
        metrics["max_logit_per_layer"] = ml.float().amax(dim=1)
    return _jsonable(metrics)


def format_grad_norm(engine_norm: float, metrics: dict[str, Any] | None, *, optimizer_norm_is_global: bool) -> str:
    """The console line's gradient norm.

    ``engine_norm`` is what the engine measured after backward (NaN when it had none: with
    optimizer-owned reduction on several ranks no rank holds the reduced gradient before
    ``step()``). Then the optimizer's own ``grad_norm`` metric is printed: the global norm of the
    reduced gradient, before clipping, when MuonClip clipped with it (``max_grad_norm``: optimizer-
    owned reduction with ``--grad-clip`` > 0), else the norm of the reduced pieces this rank holds
    (no collective is spent on a metric), labelled so.
    """
    if math.isfinite(engine_norm):
        return f"{engine_norm:.3f}"
    value = (metrics or {}).get("grad_norm")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.3f}" if optimizer_norm_is_global else f"{value:.3f} (this rank's share)"
    return "n/a"


def param_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's full value in name order (DTensors gathered: a collective):
    equal checksums mean bit-identical models, whatever engine trained them."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(name.encode())
        # clone: .numpy() pins the storage, and after an eval forward FSDP2 hands out its unsharded
        # parameters here; a pinned one cannot be freed by the next reshard ("Trying to resize storage
        # that is not resizable" in the final save)
        digest.update(full.detach().float().cpu().contiguous().clone().numpy().tobytes())
    return digest.hexdigest()


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast: str) -> torch.Tensor:
    """Mean next-byte cross-entropy over this rank's tokens (fp32 logits)."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _global_mean(value: torch.Tensor, ctx: DistContext) -> float:
    """Mean over ranks of a per-rank scalar (ranks hold equal token counts: the global mean)."""
    value = value.detach().float().reshape(1).clone()
    if ctx.backend is not None and ctx.world_size > 1:
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value.item())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             ctx: DistContext, autocast: str) -> float:
    """Mean loss over the fixed held-out batches (this rank's slices, averaged over ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=ctx.device)
    for inputs, targets in batches:
        total += _loss(model, inputs.to(ctx.device), targets.to(ctx.device), autocast)
    model.train(was_training)
    return _global_mean(total / len(batches), ctx)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training loop described by ``args`` (see :func:`build_parser`); returns the log
    (also written to ``--out`` by rank 0)."""
    ctx = setup_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        teardown_distributed(ctx)


def _train(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if args.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global, in sequences) must be divisible by the "
                         f"world size {ctx.world_size}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    model_cfg = load_model_config(args.model, path=args.model_config, overrides=args.overrides)
    model = build_model(model_cfg, seed=args.seed, attn_implementation=args.attn_implementation,
                        vocab_size=VOCAB_SIZE).to(ctx.device)
    num_params = sum(p.numel() for p in model.parameters())
    engine_kw = {"fsdp": {"mixed_precision": args.fsdp_mixed_precision},
                 "deepspeed": {"config": args.deepspeed_config}}.get(args.engine, {})
    engine = ENGINES[args.engine](model, ctx, grad_reduction=args.grad_reduction, **engine_kw)
    if hasattr(engine, "build_optimizer"):     # deepspeed: the engine owns the optimizer
        optimizer = engine.build_optimizer(args, build_optimizer)
    else:
        optimizer = build_optimizer(args, model, **getattr(engine, "optimizer_kwargs", dict)())
    schedule = not getattr(engine, "config_scheduler", False)   # a DeepSpeed scheduler section drives lr
    profiler = None
    if args.profile:
        from dist_muonclip.profiler import StepProfiler

        # one record per training step (profiler.step() below): DeepSpeed steps its inner
        # optimizer once per parameter group and all-gathers partitions after it
        profiler = StepProfiler(args.profile, model=model, wire=args.profile_wire, manual_step=True).attach(
            getattr(engine, "inner_optimizer", optimizer))                # AdamW too (no phases)
        if not args.profile_wire and ctx.world_size > 1 and hasattr(engine.model, "register_comm_hook"):
            from dist_muonclip.comm import ddp_accounting_hook           # DDP: count its all-reduces

            engine.model.register_comm_hook(profiler.accountant, ddp_accounting_hook)
    base_lrs = _base_lrs(optimizer)

    corpus = split_corpus(load_corpus(args.corpus))
    data_kw = dict(global_batch=args.batch_size, seq_len=args.seq_len, rank=ctx.rank,
                   world_size=ctx.world_size, seed=args.seed, corpus=corpus)
    held_out = eval_batches(args.eval_batches, **data_kw)

    start_step = 0
    if args.resume:
        # One command is both the first start and every restart (torchrun --max-restarts): resume from
        # the newest complete checkpoint, or start fresh when there is none yet.
        engine_ckpt = hasattr(engine, "load_checkpoint")       # fsdp, deepspeed: step_* directories
        ckpt_path = (engine.resolve_checkpoint(args.resume) if engine_ckpt
                     else resolve_checkpoint(args.resume, kind="file"))
        _agree_on_checkpoint(ckpt_path, ctx)
        if ckpt_path is None:
            if ctx.is_main:
                tqdm.write(f"--resume {args.resume}: no complete checkpoint there yet, starting from step 0")
        elif engine_ckpt:
            start_step = engine.load_checkpoint(ckpt_path, optimizer=optimizer)["step"]
        else:
            ckpt = _load_file_checkpoint(ckpt_path, ctx.device)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])
            start_step = int(ckpt["step"])
        if start_step > args.steps:
            raise ValueError(f"checkpoint {ckpt_path} is at step {start_step} > --steps {args.steps}")
        if ckpt_path is not None and ctx.is_main:
            tqdm.write(f"resumed from {ckpt_path} at step {start_step}")

    tokens_per_step = args.batch_size * args.seq_len
    log: dict[str, Any] = {
        "args": _jsonable(vars(args)), "model_config": model_cfg, "num_params": num_params,
        "world_size": ctx.world_size, "device": str(ctx.device), "engine": args.engine,
        "torch": torch.__version__, "start_step": start_step, "steps": [], "evals": [],
    }
    say = (lambda msg: tqdm.write(msg)) if ctx.is_main else (lambda msg: None)
    say(f"model {model_cfg['model_type']} ({args.model_config or args.model or DEFAULT_PRESET}): "
        f"{num_params / 1e6:.2f}M params | optimizer {args.optimizer} lr {args.lr:g}"
        + (f" adamw_lr {args.adamw_lr:g}" if args.optimizer == "muonclip" else "")
        + f" | world {ctx.world_size} on {ctx.device} ({args.engine}, {args.grad_reduction} grad reduction)"
        + (f" | {engine.source}" + ("" if schedule else ", lr from the config's scheduler")
           if getattr(engine, "source", "") else "")
        + f" | global batch {args.batch_size}x{args.seq_len} = {tokens_per_step} tokens/step")

    # MuonClip measured the global norm itself when it clipped inside step() (build_optimizer)
    optimizer_clips = args.optimizer == "muonclip" and args.grad_reduction == "optimizer" and args.grad_clip > 0
    bar = tqdm(total=args.steps, initial=start_step, disable=not ctx.is_main or args.no_progress,
               dynamic_ncols=True, desc="train")
    window_t, window_tokens, window_losses = time.perf_counter(), 0, []
    run_t0 = time.perf_counter()
    for step in range(start_step, args.steps):
        ckpt_files.fault_point("step", step, ctx.rank)   # test-only: DMC_FAULT=step:N[:rank] kills here
        ckpt_files.fault_point("ns", step, ctx.rank)     # test-only: DMC_FAULT=ns:N[:rank] raises in step()
        t0 = time.perf_counter()
        if schedule:
            _set_lr(optimizer, base_lrs, lr_factor(step, total_steps=args.steps, warmup_steps=args.warmup_steps))
        lr_now = float(optimizer.param_groups[0]["lr"])
        inputs, targets = batch_for_step(step, split="train", **data_kw)
        inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
        loss = _loss(engine.model, inputs, targets, args.autocast)
        if hasattr(engine, "backward_step"):   # deepspeed: backward, clip, step, zero grads, scheduler
            grad_norm = engine.backward_step(loss)
        else:
            loss.backward()
            with comm_tag("grad_norm"):       # profiled as all_reduce[grad_norm] (FSDP: one all-reduce)
                grad_norm = engine.clip_grad_norm_(0.0 if args.grad_reduction == "optimizer" else args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with comm_tag("loss"):
            loss_value = _global_mean(loss, ctx)  # also the per-step sync point for timing
        if profiler is not None:
            profiler.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss {loss_value} at step {step}; lower --lr")
        metrics = _optimizer_metrics(optimizer)
        # None: the optimizer reduces gradients itself, no rank holds the global gradient (NaN/null)
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        row = {"step": step, "loss": loss_value, "lr": lr_now, "grad_norm": _jsonable(grad_norm),
               "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        if metrics is not None:
            row["metrics"] = metrics
        log["steps"].append(row)
        window_tokens += tokens_per_step
        window_losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.perf_counter() - window_t
            extra = ""
            if metrics is not None and metrics.get("max_logit_per_layer") is not None:
                extra = " | max logit/layer " + " ".join(
                    "-" if v is None else f"{v:.1f}" for v in metrics["max_logit_per_layer"])
            say(f"step {done:>6}/{args.steps} | loss {sum(window_losses) / len(window_losses):.4f} | "
                f"lr {lr_now:.3g} | grad norm "
                f"{format_grad_norm(grad_norm, metrics, optimizer_norm_is_global=optimizer_clips)} | "
                f"{window_tokens / elapsed:,.0f} tokens/s{extra}")
            window_t, window_tokens, window_losses = time.perf_counter(), 0, []
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            with comm_tag("eval"):
                eval_loss = evaluate(model, held_out, ctx, args.autocast)
            log["evals"].append({"step": done, "eval_loss": eval_loss})
            say(f"step {done:>6}/{args.steps} | eval loss {eval_loss:.4f}")
        if args.save and args.save_every and done % args.save_every == 0 and done != args.steps:
            if hasattr(engine, "save_checkpoint"):
                engine.save_checkpoint(args.save, step=done, optimizer=optimizer)
            else:
                save_checkpoint(args.save, step=done, model=model, optimizer=optimizer, args=args, ctx=ctx)
    bar.close()
    if profiler is not None:
        profiler.close()      # writes the trace, prints the summary on rank 0

    eval_loss = evaluate(model, held_out, ctx, args.autocast)
    log["evals"].append({"step": args.steps, "eval_loss": eval_loss})
    tail = [r["loss"] for r in log["steps"][-10:]]
    log["final_train_loss"] = sum(tail) / len(tail) if tail else None  # mean of the last 10 steps
    log["final_eval_loss"] = eval_loss
    log["wall_s"] = time.perf_counter() - run_t0
    log["param_sha256"] = param_checksum(model)
    times = [r["step_time_s"] for r in log["steps"][1:]] or [r["step_time_s"] for r in log["steps"]]
    log["mean_tokens_per_s"] = tokens_per_step * len(times) / sum(times) if times else None
    say(f"final: train loss (last 10 steps) {log['final_train_loss']} | eval loss {eval_loss:.4f} | "
        f"{log['wall_s']:.1f}s")
    if args.save:
        if hasattr(engine, "save_checkpoint"):
            engine.save_checkpoint(args.save, step=args.steps, optimizer=optimizer)
        else:
            save_checkpoint(args.save, step=args.steps, model=model, optimizer=optimizer, args=args, ctx=ctx)
    if args.out and ctx.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(log, f, indent=1)
    getattr(engine, "close", lambda: None)()
    return log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


def _exit_now(code: int) -> None:
    """Leave the CLI process without interpreter teardown once everything is written: gloo's
    background threads can abort it there ("terminate called without an active exception",
    SIGABRT) after a successful run, which torchrun then reports as a failed job."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())

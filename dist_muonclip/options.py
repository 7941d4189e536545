"""MuonClip's options as JSON: one schema, generated from the code, for configs and their reference.

The source of truth is :class:`dist_muonclip.MuonClip`'s constructor (``inspect.signature``: names,
annotations, defaults; its docstring's ``Args:``: meanings) and the fields of
:class:`dist_muonclip.qk_clip.QKClipConfig`. From them this module builds

* the JSON schema of a DeepSpeed ``"optimizer": {"type": "MuonClip", "params": {...}}`` section
  (:func:`muonclip_options`, :func:`qk_clip_options`): key, JSON kind, default, meaning;
* the parser of such a section (:func:`parse_muonclip_section`), which also reads DeepSpeed's own
  Muon keys (``muon_lr``, ``adam_lr``, ``ns_method``, ...: :data:`DEEPSPEED_MUON_KEYS`) and
  ``"auto"`` values filled by the caller (HF Trainer fills lr, betas, eps, weight_decay);
* ``configs/REFERENCE.md`` (:func:`render_reference`)::

      python -m dist_muonclip.options --write configs/REFERENCE.md    # regenerate
      python -m dist_muonclip.options --check configs/REFERENCE.md    # exit 1 when stale

A new constructor argument therefore appears in configs and docs by itself; one whose annotation
has no JSON kind stops generation until it is given one (:data:`KIND_OF_ANY`) or excluded
(:data:`NOT_JSON`). This module imports no DeepSpeed; :mod:`dist_muonclip.integrations.deepspeed`
uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = [
    "Option",
    "REQUIRED",
    "NOT_JSON",
    "ENGINE_OWNED",
    "DEEPSPEED_MUON_KEYS",
    "muonclip_options",
    "deepspeed_options",
    "qk_clip_options",
    "parse_muonclip_section",
    "render_reference",
]

REQUIRED = "required"

# Constructor arguments that take Python objects (a model, a process group, a layout, ...): they
# have no JSON form, so a config never carries them. The one list of what is left out.
NOT_JSON: dict[str, str] = {
    "model_or_params": "the model: passed to initialize(model=...)",
    "process_group": "a torch.distributed group: DeepSpeed's data-parallel group is used",
    "accountant": "a CommAccountant object: initialize(..., accountant=...)",
    "layout": "a Layout object: chosen from what DeepSpeed does with the parameters",
    "wandb_run": "a W&B run object: use log_dir for TensorBoard, or build MuonClip yourself",
    "profiler": "a profiler object: build MuonClip yourself and pass optimizer=",
}

# JSON-able arguments that a DeepSpeed engine decides for itself: rejected in a DeepSpeed section,
# naming what to write instead.
ENGINE_OWNED: dict[str, str] = {
    "grad_reduction": "DeepSpeed reduces the gradients (grad_reduction is always \"external\" under DeepSpeed); "
                      "remove the key",
    "max_grad_norm": "use DeepSpeed's top-level \"gradient_clipping\" (it clips the raw reduced gradient before "
                     "MuonClip's step, as max_grad_norm would)",
    "bucket_cap_mb": "it sizes the optimizer-owned gradient reduction, which DeepSpeed replaces; use "
                     "zero_optimization.reduce_bucket_size",
}

# Annotations of type Any: their JSON kind, stated here (anything else unknown stops generation).
KIND_OF_ANY: dict[str, str] = {
    "ns_coefficients": "coefficients",
    "qk_clip": "qk_clip",
    "model_config": "dict_or_null",
}

_KIND_OF_ANNOTATION: dict[str, str] = {
    "float": "number", "int": "int", "bool": "bool", "str": "str",
    "float | None": "number_or_null", "int | None": "int_or_null", "bool | None": "bool_or_null",
    "str | None": "str_or_null", "tuple[float, float]": "pair", "Sequence[str]": "str_list",
    "torch.dtype | str": "dtype", "dict[str, str] | None": "dict_or_null",
}

_KIND_TEXT = {"number": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "number_or_null": "a number or null", "int_or_null": "an integer or null",
              "bool_or_null": "true, false or null", "str_or_null": "a string or null",
              "pair": "a list of two numbers", "str_list": "a list of strings", "dict_or_null": "an object or null",
              "dtype": "a dtype name (\"bfloat16\" or \"float32\")",
              "coefficients": "a string, [a, b, c] or a list of [a, b, c]",
              "qk_clip": "null, true, false or an object"}


@dataclass(frozen=True)
class Option:
    """One JSON key: ``kind`` (see ``_KIND_TEXT``), ``default`` (a JSON value, or
    :data:`REQUIRED`) and ``doc`` (from the docstring)."""

    name: str
    kind: str
    default: Any
    doc: str


# --------------------------------------------------------------------------------------------
# The schema, from the code
# --------------------------------------------------------------------------------------------

def _docstring_args(doc: str | None) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Args:`` section; ``a, b: text`` gives both names the text."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    indent = None
    names: list[str] = []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        ind = len(line) - len(line.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        m = re.match(r"^([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s*(.*)$", line.strip())
        if ind == indent and m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def _json_default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return REQUIRED
    if isinstance(value, torch.dtype):
        return str(value).split(".")[-1]
    if isinstance(value, tuple):
        return [_json_default(v) for v in value]
    json.dumps(value)          # raises for a default with no JSON form: add the key to NOT_JSON
    return value


def _kind(owner: str, name: str, annotation: Any) -> str:
    if name in KIND_OF_ANY:
        return KIND_OF_ANY[name]
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    text = text.replace("typing.", "")
    if text not in _KIND_OF_ANNOTATION:
        raise TypeError(f"{owner}.{name}: annotation {text!r} has no JSON kind; add it to "
                        "dist_muonclip.options.KIND_OF_ANY or NOT_JSON")
    return _KIND_OF_ANNOTATION[text]


def muonclip_options() -> dict[str, Option]:
    """Every JSON-able argument of ``MuonClip.__init__`` (those in :data:`NOT_JSON` left out),
    in signature order."""
    from .optimizer import MuonClip

    docs = _docstring_args(MuonClip.__doc__)
    out: dict[str, Option] = {}
    for name, prm in inspect.signature(MuonClip.__init__).parameters.items():
        if name == "self" or name in NOT_JSON:
            continue
        out[name] = Option(name, _kind("MuonClip", name, prm.annotation), _json_default(prm.default),
                           docs.get(name, ""))
    return out


def qk_clip_options() -> dict[str, Option]:
    """Every field of :class:`~dist_muonclip.qk_clip.QKClipConfig`, in field order."""
    from .qk_clip import QKClipConfig

    docs = _docstring_args(QKClipConfig.__doc__)
    out: dict[str, Option] = {}
    for f in dataclasses.fields(QKClipConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = Option(f.name, _kind("QKClipConfig", f.name, f.type), _json_default(default),
                             docs.get(f.name, ""))
    return out


def deepspeed_options() -> dict[str, Option]:
    """The keys a DeepSpeed section accepts under MuonClip's own names."""
    return {k: o for k, o in muonclip_options().items() if k not in ENGINE_OWNED}


# --------------------------------------------------------------------------------------------
# DeepSpeed's Muon keys ("type": "Muon" in DeepSpeed 0.19): how a MuonClip section reads them
# --------------------------------------------------------------------------------------------

# key -> (JSON kind, MuonClip key it sets or None, meaning / mapping). Values that have no
# MuonClip equivalent are refused by _translate_deepspeed_key, naming the replacement.
DEEPSPEED_MUON_KEYS: dict[str, tuple[str, str | None, str]] = {
    "muon_lr": ("number", "lr", "lr of the Muon part; then `lr`, when also given, is the AdamW part's lr (DeepSpeed: "
                                "`lr` is shared, `muon_lr`/`adam_lr` override it per part)"),
    "adam_lr": ("number", "adamw_lr", "lr of the AdamW part"),
    "betas": ("pair", "adamw_betas", "AdamW (beta1, beta2)"),
    "eps": ("number", "adamw_eps", "AdamW epsilon"),
    "ns_method": ("str", "ns_coefficients",
                  "\"standard\" and \"gram\" -> `ns_coefficients: \"jordan\"`: both are Keller Jordan's quintic "
                  "(3.4445, -4.7750, 2.0315) x5. Gram Newton-Schulz iterates on X X^T instead of X, the same "
                  "polynomial in exact arithmetic (measured in float64: max difference 2.6e-15 on 64..480-wide "
                  "matrices, tests/test_options.py); MuonClip runs the standard association in `ns_dtype` "
                  "(DeepSpeed's gram runs fp16 on GPUs, fp32 on CPU)"),
    "adam_w_mode": ("bool", None, "true (default): decoupled weight decay, which is MuonClip's AdamW; false (Adam "
                                  "with L2 regularization) has no equivalent and is refused"),
    "torch_adam": ("bool", None, "accepted, no effect: MuonClip's AdamW part always runs torch's AdamW kernels "
                                 "(pick foreach/fused with `adamw_foreach`/`adamw_fused`)"),
    "foreach": ("bool_or_null", "adamw_foreach", "torch AdamW's foreach flag (DeepSpeed passes it with torch_adam)"),
    "fp32_optimizer_states": ("bool", None, "true accepted (MuonClip's state is fp32); false (bf16 CPU-offload "
                                            "state) is refused"),
    "per_head_muon": ("bool", None, "false accepted; true (Newton-Schulz per attention head) is refused: MuonClip "
                                    "orthogonalizes each whole matrix"),
}

# a section using any of these is read in DeepSpeed's dialect (see _DIALECT_DEFAULTS)
_DEEPSPEED_ONLY = ("muon_lr", "adam_lr", "betas", "eps", "ns_method", "adam_w_mode", "torch_adam", "foreach",
                   "fp32_optimizer_states", "per_head_muon")
# What DeepSpeed's keys mean beyond their own value: DeepSpeed's Muon scales the update by
# sqrt(max(1, m / n)) (original_muon._aspect_ratio_scale), i.e. MuonClip's adjust_lr_fn="original";
# its muon_lr / lr are tuned for that scale, not for match_rms_adamw's 0.2 * sqrt(max(m, n)).
_DIALECT_DEFAULTS: dict[str, Any] = {"adjust_lr_fn": "original"}

# Names a caller's auto_values may use for an option (HF Trainer fills "lr", "betas", "eps",
# "weight_decay" of an optimizer section, whatever the optimizer).
_AUTO_ALIASES: dict[str, tuple[str, ...]] = {"adamw_betas": ("betas",), "adamw_eps": ("eps",),
                                             "adamw_lr": ("adam_lr",), "lr": ("muon_lr",)}


# --------------------------------------------------------------------------------------------
# Parsing a section
# --------------------------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind_ok(kind: str, value: Any) -> bool:
    def triple(r: Any) -> bool:
        return isinstance(r, (list, tuple)) and len(r) == 3 and all(_is_number(v) for v in r)

    if kind == "coefficients":
        return isinstance(value, str) or triple(value) or (
            isinstance(value, (list, tuple)) and len(value) > 0 and all(triple(r) for r in value))
    if kind == "pair":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
    if kind == "str_list":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if kind == "qk_clip":
        return value is None or isinstance(value, (bool, dict))
    base, _, null = kind.partition("_or_")
    if null and value is None:
        return True
    return {"number": _is_number(value), "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool), "str": isinstance(value, str), "dtype": isinstance(value, str),
            "dict": isinstance(value, dict)}[base]


def _check_kind(path: str, kind: str, value: Any) -> None:
    if not _kind_ok(kind, value):
        raise TypeError(f"DeepSpeed config {path} must be {_KIND_TEXT[kind]}, got {value!r} ({type(value).__name__})")


def _unknown_key(path: str, key: str, allowed: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"DeepSpeed config {path}: unknown key {key!r}{hint}; MuonClip accepts "
                      f"{', '.join(sorted(allowed))} (see configs/REFERENCE.md)")


# kinds whose values are strings: there "auto" may be a value of its own (ns_backend, qk_clip.track, ...)
_STRING_KINDS = ("str", "str_or_null", "dtype", "coefficients")


def _fill_auto(path: str, key: str, value: Any, auto_values: Mapping[str, Any], canonical: str | None,
               kind: str) -> Any:
    """``"auto"`` -> the caller's value for ``key`` (or an alias of it). Unfilled: kept for a
    string option (where ``"auto"`` is a choice, e.g. ``ns_backend``), else ValueError."""
    if not (isinstance(value, str) and value == "auto"):
        return value
    names = [key] + ([canonical] if canonical and canonical != key else [])
    names += [a for n in list(names) for a in _AUTO_ALIASES.get(n, ()) if a not in names]
    for n in names:
        if n in auto_values and not (isinstance(auto_values[n], str) and auto_values[n] == "auto"):
            return auto_values[n]
    if kind in _STRING_KINDS:
        return value
    raise ValueError(f"DeepSpeed config {path} is \"auto\" but nothing fills it: pass auto_values={{{key!r}: ...}} "
                     "(HF Trainer fills lr, betas, eps and weight_decay from TrainingArguments) or write the value")


def _translate_deepspeed_key(key: str, value: Any) -> tuple[str | None, Any]:
    """A DeepSpeed Muon key -> (MuonClip key or None for "no effect", value); raises when the
    value has no MuonClip equivalent."""
    path = f"optimizer.params.{key}"
    if key == "ns_method":
        if value not in ("standard", "gram"):
            raise ValueError(f"DeepSpeed config {path}={value!r}: DeepSpeed's Muon knows \"standard\" and \"gram\" "
                             "(both map to ns_coefficients \"jordan\"); for other schedules use ns_coefficients "
                             "(\"jordan\", \"polar_express\", \"cans\" or explicit coefficients)")
        return "ns_coefficients", "jordan"
    if key == "adam_w_mode" and value is False:
        raise ValueError(f"DeepSpeed config {path}=false (Adam with L2 regularization) has no MuonClip equivalent: "
                         "MuonClip's AdamW part uses decoupled weight decay; remove adam_w_mode (or set it true)")
    if key == "fp32_optimizer_states" and value is False:
        raise ValueError(f"DeepSpeed config {path}=false: MuonClip keeps its optimizer state in fp32 (and does not "
                         "support optimizer offload); remove fp32_optimizer_states")
    if key == "per_head_muon" and value is True:
        raise ValueError(f"DeepSpeed config {path}=true: per-head Newton-Schulz is not implemented in MuonClip (it "
                         "orthogonalizes each whole matrix); remove per_head_muon or set it false")
    target = DEEPSPEED_MUON_KEYS[key][1]
    return target, value


def parse_muonclip_section(section: Mapping[str, Any], *, auto_values: Mapping[str, Any] | None = None
                           ) -> dict[str, Any]:
    """Validate a config's ``"optimizer"`` section of type MuonClip; return MuonClip kwargs.

    Keys are MuonClip's own (:func:`deepspeed_options`) or DeepSpeed Muon's
    (:data:`DEEPSPEED_MUON_KEYS`, translated; giving one option under both names is an error). A
    section using a DeepSpeed-only key is read with DeepSpeed's update scale (``adjust_lr_fn``
    defaults to ``"original"``) unless it sets ``adjust_lr_fn``. A value ``"auto"`` takes
    ``auto_values[key]`` (or the value of an alias: ``betas`` for ``adamw_betas``, ...); one left
    unfilled is an error naming it. Unknown keys and wrong JSON types raise ``ValueError`` /
    ``TypeError`` naming the key path (``optimizer.params.qk_clip.tau``); values are checked in
    full again when MuonClip is built, still before any state exists.
    """
    auto_values = dict(auto_values or {})
    if not isinstance(section, Mapping):
        raise TypeError(f"DeepSpeed config 'optimizer' must be an object, got {type(section).__name__}")
    for key in section:
        if key not in ("type", "params"):
            raise _unknown_key("optimizer", key, ("type", "params"))
    params = section.get("params", {})
    if not isinstance(params, Mapping):
        raise TypeError(f"DeepSpeed config optimizer.params must be an object, got {type(params).__name__}")
    own = deepspeed_options()
    qk = qk_clip_options()
    kwargs: dict[str, Any] = {}
    given_as: dict[str, str] = {}          # MuonClip key -> the key it was written as
    deepspeed_dialect = False
    shared_lr = None                       # DeepSpeed's shared `lr`, when muon_lr is also given

    def put(target: str, value: Any, written: str) -> None:
        if target in given_as:
            raise ValueError(f"DeepSpeed config optimizer.params: {given_as[target]!r} and {written!r} both set "
                             f"MuonClip's {target}; keep one")
        given_as[target] = written
        kwargs[target] = value

    for key, value in params.items():
        path = f"optimizer.params.{key}"
        if key in ENGINE_OWNED:
            raise ValueError(f"DeepSpeed config {path} is not a DeepSpeed MuonClip option: {ENGINE_OWNED[key]}")
        if key == "lr" and "muon_lr" in params:     # DeepSpeed's shared lr: the AdamW part's (below)
            shared_lr = _fill_auto(path, key, value, auto_values, "lr", "number")
            _check_kind(path, "number", shared_lr)
            continue
        if key in own:
            opt = own[key]
            value = _fill_auto(path, key, value, auto_values, key, opt.kind)
            _check_kind(path, opt.kind, value)
            if opt.kind == "qk_clip" and isinstance(value, dict):
                value = dict(value)
                for qk_key, qv in value.items():
                    if qk_key not in qk:
                        raise _unknown_key("optimizer.params.qk_clip", qk_key, list(qk))
                    qv = _fill_auto(f"{path}.{qk_key}", f"qk_clip.{qk_key}", qv, auto_values, None, qk[qk_key].kind)
                    _check_kind(f"{path}.{qk_key}", qk[qk_key].kind, qv)
                    value[qk_key] = qv
            if opt.kind == "pair":
                value = tuple(value)
            if opt.kind == "coefficients" and not isinstance(value, str):
                value = tuple(value) if _is_number(value[0]) else [tuple(r) for r in value]
            put(key, value, key)
        elif key in DEEPSPEED_MUON_KEYS:
            kind, canonical, _ = DEEPSPEED_MUON_KEYS[key]
            value = _fill_auto(path, key, value, auto_values, canonical, kind)
            _check_kind(path, kind, value)
            deepspeed_dialect = True
            target, value = _translate_deepspeed_key(key, value)
            if kind == "pair":
                value = tuple(value)
            if target is not None:
                put(target, value, key)
        else:
            raise _unknown_key("optimizer.params", key, list(own) + list(DEEPSPEED_MUON_KEYS))
    if given_as.get("lr") == "muon_lr":
        # DeepSpeed: `lr` is both parts' lr, muon_lr / adam_lr override it per part
        if "adamw_lr" not in kwargs:
            if shared_lr is None:
                raise ValueError("DeepSpeed config optimizer.params.muon_lr is given without lr or adam_lr: set adam_lr "
                                 "(the AdamW part's lr; DeepSpeed's Muon would fall back to its Adam default)")
            kwargs["adamw_lr"] = shared_lr
    if "lr" not in kwargs:
        raise ValueError("DeepSpeed config optimizer.params.lr is required for MuonClip (e.g. \"lr\": 0.01 with the "
                         "default adjust_lr_fn=\"match_rms_adamw\", which lets an AdamW-tuned lr serve both parts)")
    if deepspeed_dialect:
        for key, value in _DIALECT_DEFAULTS.items():
            kwargs.setdefault(key, value)
    return kwargs


# --------------------------------------------------------------------------------------------
# configs/REFERENCE.md
# --------------------------------------------------------------------------------------------

_HEADER = """\
# MuonClip in a DeepSpeed config: every key

<!-- Generated by `python -m dist_muonclip.options --write configs/REFERENCE.md` from
     MuonClip.__init__ and QKClipConfig; do not edit by hand (tests/test_options.py fails when stale). -->

The `"optimizer"` section of a DeepSpeed JSON config selects MuonClip with `"type": "MuonClip"`;
`"params"` takes the keys below (the names of the `dist_muonclip.MuonClip` constructor), or DeepSpeed
Muon's own keys (next section). Unknown keys and wrong JSON types are rejected with the key path
(e.g. `optimizer.params.qk_clip.tau`) before anything is built; values are range-checked when the
optimizer is built, still before DeepSpeed touches the model. Every default below is accepted when
written into a config. A value `"auto"` is taken from the caller (`parse_muonclip_section(section,
auto_values={...})`, `dist_muonclip.deepspeed.initialize(..., auto_values={...})`; HF Trainer fills
`lr`, `betas`, `eps`, `weight_decay`); an `"auto"` nobody fills is an error naming the key.
Load the config with `dist_muonclip.deepspeed.initialize(model=..., config="configs/zero2_bf16.json")`
(or `--deepspeed_config`).
"""

_QK_INTRO = """\
`null` (default): QK-Clip on with defaults when the model's attention layers are found, else off;
`false`: off; `true` or an object: on (an error if no attention layer is found). The object's keys
are the fields of `dist_muonclip.qk_clip.QKClipConfig`:
"""

_DEEPSPEED_INTRO = """\
A section written for DeepSpeed's built-in Muon (`"type": "Muon"`, DeepSpeed 0.19) keeps working
after changing the type to `"MuonClip"`: its keys are read with DeepSpeed's meaning. Giving one
option under both names (`adam_lr` and `adamw_lr`, `betas` and `adamw_betas`, ...) is an error.
A section that uses any of these keys also takes DeepSpeed's update scale: `adjust_lr_fn` defaults
to `"original"` (sqrt(max(1, m/n)), DeepSpeed's `_aspect_ratio_scale`) instead of
`"match_rms_adamw"`, so `muon_lr`/`lr` keep the step size they were tuned for; set `adjust_lr_fn`
to choose. Keys absent from the section take MuonClip's defaults, not DeepSpeed Muon's (e.g.
`weight_decay` 0.1 here, 0 there). `lr` is DeepSpeed's shared lr: with `muon_lr` it is the AdamW
part's lr unless `adam_lr` is given; `muon_lr` alone (no `lr`, no `adam_lr`) is refused.
Parameters tagged `param.use_muon = True/False` (DeepSpeed Muon's tags) go to Muon/AdamW as
tagged, overriding MuonClip's automatic split (`verbose` shows "tag" as the reason).
"""

_TAIL = """\
## Annotated example (JSONC: strip the comments before use)

```jsonc
{
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 1,
  "gradient_clipping": 1.0,            // clips the RAW reduced gradient before Newton-Schulz, never the update
  "bf16": {"enabled": true},           // bf16 params/grads, fp32 master weights (omit for fp32)
  "zero_optimization": {"stage": 2},   // 0, 1 or 2; stage 3 is refused (use FSDP2 for parameter sharding)
  "optimizer": {
    "type": "MuonClip",
    "params": {
      "lr": 0.01,                      // Muon lr; with match_rms_adamw an AdamW-tuned lr works
      "adamw_lr": 0.003,               // AdamW part (embeddings, head, norms, biases); null = lr
      "momentum": 0.95, "nesterov": true,
      "weight_decay": 0.1,             // decoupled; adamw_weight_decay overrides it for the AdamW part
      "ns_steps": 5, "ns_coefficients": "jordan", "ns_backend": "auto",
      "ns_dtype": "bfloat16",          // "float32" for bit-stable runs (tests use it)
      "adjust_lr_fn": "match_rms_adamw",
      "adamw_betas": [0.9, 0.95], "adamw_eps": 1e-8,
      "qk_clip": {"tau": 100.0, "alpha": 0.5},
      "muon_patterns": [], "adamw_patterns": ["*.router.weight"],
      "skip_nonfinite": true
    }
  },
  "scheduler": {                       // any DeepSpeed scheduler: it scales lr AND adamw_lr by the same factor
    "type": "WarmupCosineLR",
    "params": {"total_num_steps": 1000, "warmup_num_steps": 10, "warmup_type": "linear", "cos_min_ratio": 0.1}
  }
}
```

The same run written with DeepSpeed Muon's keys (a model tagged with `param.use_muon`):

```json
{"type": "MuonClip", "params": {"muon_lr": 0.02, "adam_lr": 0.003, "momentum": 0.95, "weight_decay": 0.1,
                                "betas": [0.9, 0.95], "eps": 1e-8, "ns_method": "gram"}}
```

equals `{"lr": 0.02, "adamw_lr": 0.003, "momentum": 0.95, "weight_decay": 0.1, "adamw_betas": [0.9, 0.95],
"adamw_eps": 1e-8, "ns_coefficients": "jordan", "adjust_lr_fn": "original"}` with `adamw_patterns`/
`muon_patterns` naming what the tags move (tests/test_deepspeed_muon_keys.py checks the two runs are
bit-identical at ZeRO-0/1/2).

## Ready configs

| file | ZeRO | precision | what DeepSpeed hands MuonClip |
|---|---|---|---|
| `zero0.json` | 0 | fp32 | the parameters; DeepSpeed all-reduces gradients (Replicated layout) |
| `zero0_bf16.json` | 0 | bf16 + fp32 masters | full fp32 masters per parameter (split into equal slices, all-gathered after the step) |
| `zero1.json` | 1 | fp32 | a flat fp32 partition per rank (FlatFragments layout) |
| `zero1_bf16.json` | 1 | bf16 + fp32 masters | BF16_Optimizer's flat fp32 partition (FlatFragments layout) |
| `zero2.json` | 2 | fp32 | flat fp32 partition, reduce-scattered gradients (FlatFragments layout) |
| `zero2_bf16.json` | 2 | bf16 + fp32 masters | same, bf16 parameters (FlatFragments layout) |

`train_batch_size` is left out so the same file works at any world size (DeepSpeed derives it from
the micro batch, accumulation steps and world size).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(options: Mapping[str, Option]) -> list[str]:
    rows = ["| key | JSON type | default | meaning |", "|---|---|---|---|"]
    for o in options.values():
        default = "required" if o.default == REQUIRED else f"`{json.dumps(o.default)}`"
        rows.append(f"| `{o.name}` | {_KIND_TEXT[o.kind]} | {default} | {_cell(o.doc)} |")
    return rows


def render_reference() -> str:
    """The text of ``configs/REFERENCE.md``, generated from the code."""
    out = [_HEADER, "## `optimizer.params`", ""]
    out += _table(deepspeed_options())
    out += ["", "## `optimizer.params.qk_clip` (object form)", "", _QK_INTRO]
    out += _table(qk_clip_options())
    out += ["", "## DeepSpeed Muon's keys", "", _DEEPSPEED_INTRO]
    out += ["| key | JSON type | MuonClip equivalent | meaning |", "|---|---|---|---|"]
    for key, (kind, target, doc) in DEEPSPEED_MUON_KEYS.items():
        out.append(f"| `{key}` | {_KIND_TEXT[kind]} | {f'`{target}`' if target else '(none)'} | {_cell(doc)} |")
    out += ["", "## Not accepted in a DeepSpeed section", "",
            "Constructor arguments that DeepSpeed decides, or that take Python objects (build `MuonClip(...)` "
            "yourself and pass `optimizer=` for those):", "",
            "| argument | why, and what to write instead |", "|---|---|"]
    for key, why in {**ENGINE_OWNED, **NOT_JSON}.items():
        out.append(f"| `{key}` | {_cell(why)} |")
    out += ["", _TAIL]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dist_muonclip.options --write PATH`` / ``--check PATH`` / (no flag: print)."""
    p = argparse.ArgumentParser(description="Generate the MuonClip JSON options reference from the code.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="PATH", help="write the reference to PATH (configs/REFERENCE.md)")
    g.add_argument("--check", metavar="PATH", help="exit 1 when PATH differs from the generated reference")
    args = p.parse_args(argv)
    text = render_reference()
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote {args.write}")
        return 0
    if args.check:
        with open(args.check) as f:
            current = f.read()
        if current != text:
            print(f"{args.check} is stale: run python -m dist_muonclip.options --write {args.check}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

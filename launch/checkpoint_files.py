"""Crash-safe checkpoint files for ``launch/train.py`` and its engines.

Every engine writes a checkpoint under a temporary name and publishes it with one atomic rename
once every byte is on disk (``fsync`` of the files, the rename, ``fsync`` of the parent
directory), so a kill at any moment leaves either the previous set of checkpoints or the previous
set plus one complete new one, never a "latest" that fails to load:

* single file (``ddp`` engine, both gradient reductions): ``step_N.pt.tmp`` -> ``step_N.pt``,
  with its SHA-256 in ``step_N.pt.sha256`` (published first, so every ``step_N.pt`` has one);
* directory (FSDP2 DCP, DeepSpeed tags): ``step_N.tmp/`` -> ``step_N/``, with ``MANIFEST.json``
  (size and SHA-256 of every file) written last inside it before the rename.

On resume :func:`latest_complete` lists the published checkpoints newest first and
:func:`verify` checks each against its hashes, so a truncated or corrupted checkpoint is reported
naming the file and resume falls back to the previous one (:func:`resolve_latest`).

Test-only fault injection (:func:`fault_point`): ``DMC_FAULT=<point>:<step>[:<rank>]`` kills this
process with SIGKILL when it reaches ``point`` (``step``: start of a training step; ``save``: a
checkpoint written under its temporary name, not yet published) at ``step`` on ``rank`` (default
1); ``ns`` does not kill: that step's Newton-Schulz raises on ``rank`` (an out-of-memory on an owner,
for the fail-fast path of :mod:`dist_muonclip.engine.failfast`); with ``DMC_FAULT_MARKER=<path>`` it fires once (the marker is created before the kill), so a
restarted job runs through.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = ["CheckpointCorruptError", "MANIFEST", "fault_point", "publish_file", "publish_dir", "verify",
           "latest_complete", "resolve_latest", "resolve", "step_of", "tmp_path", "clear_tmp"]

MANIFEST = "MANIFEST.json"
_STEP = re.compile(r"^step_(\d+)(\.pt)?$")
_CHUNK = 1 << 20


class CheckpointCorruptError(ValueError):
    """A checkpoint whose bytes differ from what was written (truncated, overwritten, missing a
    file). The message names the file."""


# -- fault injection (tests) ------------------------------------------------------------------
def fault_point(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``DMC_FAULT`` asks for ``point`` at ``step`` on ``rank`` (see the
    module doc). A no-op when ``DMC_FAULT`` is unset."""
    spec = os.environ.get("DMC_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise ValueError(f"DMC_FAULT={spec!r}: expected <point>:<step>[:<rank>] (point: step, save or ns)")
    want_rank = int(parts[2]) if len(parts) == 3 else 1
    if parts[0] != point or int(parts[1]) != step or want_rank != rank:
        return
    marker = os.environ.get("DMC_FAULT_MARKER")
    if marker:
        try:   # O_EXCL: exactly one process fires, once
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if point == "ns":
        _raise_in_next_newton_schulz(step, rank)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_in_next_newton_schulz(step: int, rank: int) -> None:
    from dist_muonclip import ns_split

    real = ns_split.orthogonalize

    def failing(*args, **kwargs):
        ns_split.orthogonalize = real          # once
        raise RuntimeError(f"DMC_FAULT: injected failure in Newton-Schulz at step {step} on rank {rank}")
    ns_split.orthogonalize = failing


# -- writing ----------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tmp_path(final: Path) -> Path:
    """The temporary name of a checkpoint (``step_N.pt.tmp``, ``step_N.tmp``)."""
    return final.with_name(final.name[:-3] + ".pt.tmp" if final.name.endswith(".pt") else final.name + ".tmp")


def clear_tmp(final: Path) -> Path:
    """Remove what a killed save left under ``final``'s temporary name; returns that name."""
    tmp = tmp_path(final)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def _replace_durably(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _fsync_path(dst.parent)


def publish_file(tmp: Path, final: Path) -> Path:
    """Publish the finished file ``tmp`` as ``final``: fsync, SHA-256 sidecar, atomic rename."""
    _fsync_path(tmp)
    side = final.with_name(final.name + ".sha256")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps({"file": final.name, "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}))
    _fsync_path(side_tmp)
    _replace_durably(side_tmp, side)      # sidecar first: a published step_N.pt always has one
    _replace_durably(tmp, final)
    return final


def publish_dir(tmp: Path, final: Path) -> Path:
    """Publish the finished directory ``tmp`` as ``final``: fsync every file, write
    ``MANIFEST.json`` (size + SHA-256 of each file) last, then one atomic rename. Call on one rank
    after every rank finished writing (a barrier)."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_path(f)
        files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    _fsync_path(manifest)
    _fsync_path(tmp)
    if final.exists():                     # an older run's step_N: replaced by this one
        shutil.rmtree(final)
    _replace_durably(tmp, final)
    return final


# -- reading ----------------------------------------------------------------------------------
def step_of(path: Path) -> int | None:
    """N for a published ``step_N.pt`` / ``step_N`` name, else None."""
    m = _STEP.match(path.name)
    return int(m.group(1)) if m else None


def verify(path: str | os.PathLike) -> bool:
    """Check a published checkpoint against its hashes; raise :class:`CheckpointCorruptError`
    naming the first bad file. Returns False (and checks nothing) for a checkpoint written
    before hashes were recorded (no sidecar / manifest)."""
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            return False
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            raise CheckpointCorruptError(f"checkpoint manifest {manifest} is unreadable: {exc}") from exc
        for rel, want in files.items():
            _check_file(path / rel, want)
        return True
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return False
    try:
        want = json.loads(side.read_text())
    except ValueError as exc:
        raise CheckpointCorruptError(f"checkpoint hash file {side} is unreadable: {exc}") from exc
    _check_file(path, want)
    return True


def _check_file(path: Path, want: dict[str, Any]) -> None:
    if not path.is_file():
        raise CheckpointCorruptError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise CheckpointCorruptError(f"checkpoint file {path} has {size} bytes, {want['bytes']} were written "
                                     "(truncated or overwritten)")
    if _sha256(path) != want["sha256"]:
        raise CheckpointCorruptError(f"checkpoint file {path} does not match the SHA-256 recorded when it was "
                                     "written (corrupted)")


def latest_complete(directory: str | os.PathLike, *, kind: str) -> list[Path]:
    """Published checkpoints in ``directory``, newest first. ``kind``: ``"file"`` (``step_N.pt``)
    or ``"dir"`` (``step_N/``). Temporary names (a save that was killed) are never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        n = step_of(p)
        if n is None or (kind == "file") != p.name.endswith(".pt"):
            continue
        if (kind == "file" and p.is_file()) or (kind == "dir" and p.is_dir()):
            found.append((n, p))
    return [p for _, p in sorted(found, reverse=True)]


def resolve_latest(directory: str | os.PathLike, *, kind: str) -> Path | None:
    """The newest published checkpoint in ``directory`` that matches its recorded hashes, falling
    back to older ones with a warning naming the bad file. None when the directory holds no
    published checkpoint (a fresh start). Raises :class:`CheckpointCorruptError` when there are
    checkpoints but every one is corrupt (starting fresh would silently discard the run)."""
    errors = []
    for path in latest_complete(directory, kind=kind):
        try:
            if not verify(path):
                warnings.warn(f"checkpoint {path} has no recorded hashes (written by an older version): loading it "
                              "unverified", stacklevel=2)
            return path
        except CheckpointCorruptError as exc:
            errors.append(str(exc))
            warnings.warn(f"skipping checkpoint {path}: {exc}; falling back to the previous one", stacklevel=2)
    if errors:
        raise CheckpointCorruptError(f"--resume {str(directory)!r}: every checkpoint is corrupt: " + "; ".join(errors))
    return None


def resolve(path: str | os.PathLike, *, kind: str, is_checkpoint: Callable[[Path], bool]) -> Path | None:
    """What ``--resume PATH`` loads: ``PATH`` itself when ``is_checkpoint(PATH)`` (verified against
    its hashes; corrupt: :class:`CheckpointCorruptError`), else the newest complete checkpoint
    inside the directory ``PATH`` (:func:`resolve_latest`), or None when it holds none or does not
    exist yet (a fresh start). A missing path that names a checkpoint (``step_N``, ``*.pt``) raises."""
    path = Path(path)
    if is_checkpoint(path):
        verify(path)
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"--resume {str(path)!r} is neither a checkpoint nor a directory of checkpoints")
    if not path.exists() and (step_of(path) is not None or path.suffix == ".pt"):
        raise ValueError(f"--resume {str(path)!r}: no such checkpoint; pass an existing checkpoint or the directory "
                         "that --save writes to")
    return resolve_latest(path, kind=kind)

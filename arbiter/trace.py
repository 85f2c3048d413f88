"""Recorded activations on disk: ``Trace`` (tensors + JSON meta in one safetensors file).
``TraceWriter`` streams long runs into resumable shards; ``read_trace_dir``/``iter_trace_dir`` read them back."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Sequence, ValuesView
from pathlib import Path
from typing import Any, Union

import safetensors
import safetensors.torch
import torch

from arbiter.errors import TraceError
from arbiter.util import atomic_write_text, fsync_dir, temp_path_beside

__all__ = ["FORMAT_VERSION", "Trace", "TraceWriter", "read_trace_dir", "iter_trace_dir", "site_key", "rows_keys"]

PathLike = Union[str, "os.PathLike[str]"]

#: Version of the trace file layout written by :meth:`Trace.save`; :meth:`Trace.load` reads up to it.
FORMAT_VERSION = 1
#: Version of the ``manifest.json`` layout written by :class:`TraceWriter`.
MANIFEST_VERSION = 1

MANIFEST_NAME = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
_TEMP_RE = re.compile(r"^\.(shard-\d+\.safetensors|manifest\.json)\..*\.tmp$")
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers
_LAYER_RE = re.compile(r"^L(\d+)\.(.+)$", re.DOTALL)
_RESERVED_NAME = "__metadata__"
_CHECKSUM = "tensors_sha256"  # header key of the tensors' checksum (absent in files saved before it existed)


# --------------------------------------------------------------------------- helpers


def _json_problem(value: Any, where: str, seen: tuple[int, ...] = ()) -> str | None:
    """Describe the first part of ``value`` that JSON cannot round-trip, or None if all is fine."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            return f"{where} contains itself (circular reference)"
        seen = (*seen, id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where} has a non-string key {key!r} (JSON keys must be str)"
                problem = _json_problem(item, f"{where}[{key!r}]", seen)
                if problem:
                    return problem
        else:
            for i, item in enumerate(value):
                problem = _json_problem(item, f"{where}[{i}]", seen)
                if problem:
                    return problem
        return None
    return f"{where} is a {type(value).__name__}, which is not JSON-serialisable"


def _dump_meta(meta: dict[str, Any], what: str = "meta") -> str:
    """``json.dumps`` of ``meta``, or a TraceError naming the key that cannot be stored."""
    if not isinstance(meta, dict):
        raise TraceError(f"trace {what} must be a dict, got {type(meta).__name__}")
    problem = _json_problem(meta, what)
    if problem:
        raise TraceError(
            f"trace {what} cannot be saved: {problem}; use only dicts with str keys, lists, "
            "str, int, float, bool and None"
        )
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as exc:  # pragma: no cover - _json_problem should catch these
        raise TraceError(f"trace {what} is not JSON-serialisable: {exc}") from exc


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file to a temp file beside ``path``, fsync it, then rename it into place."""
    try:
        tmp = temp_path_beside(path)
    except OSError as exc:
        raise TraceError(f"cannot write trace {path}: {exc}") from exc
    try:
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask (temp_path_beside); safetensors writes files 0600
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError, RuntimeError, safetensors.SafetensorError)):
            raise TraceError(f"cannot write trace {path}: {exc}") from exc
        raise
    fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each one's name, dtype and shape, then its raw bytes. Independent of
    how safetensors lays the file out, so :meth:`Trace.load` checks it on the tensors it read."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}\0{_dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _to_cpu(name: str, tensor: Any) -> torch.Tensor:
    """A detached, contiguous CPU copy of ``tensor`` (a copy, so later in-place edits do not leak in)."""
    if not isinstance(tensor, torch.Tensor):
        raise TraceError(f"trace tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TraceError(f"trace tensor {name!r} has layout {tensor.layout}; only dense tensors can be stored")
    return tensor.detach().to(device="cpu", copy=True, memory_format=torch.contiguous_format)


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TraceError(f"trace tensor names must be str, got {type(name).__name__} {name!r}")
    if name == _RESERVED_NAME:
        raise TraceError(f"{_RESERVED_NAME!r} is reserved by safetensors and cannot name a tensor")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- Trace


def site_key(site: str, layer: int | None = None, call: int = 0) -> str:
    """The name a trace gives ``site`` at ``layer`` (None: a site outside the layers, e.g. ``"logits"``) on the
    model's ``call``-th pass through it (0: the prompt; generation steps count up): ``"L3.attn.probs"``,
    ``"L3.attn.probs@2"``. The one place the schema is spelled."""
    base = site if layer is None else f"L{int(layer)}.{site}"
    return base if call == 0 else f"{base}@{int(call)}"


def rows_keys(site: str, call: int = 0) -> tuple[str, str]:
    """The names of ``site``'s row positions ([rows] absolute positions) and row mask ([batch, rows]: the row
    belongs to the requested group for that sample) on ``call``."""
    suffix = "" if call == 0 else f"@{int(call)}"
    return f"rows.{site}{suffix}", f"rowmask.{site}{suffix}"



class Trace:
    """Recorded tensors by flat name (``"L3.attn.probs"``, ``"logits"``) plus a JSON ``meta`` dict.

    Mapping-like: ``trace[name]``, ``name in trace``, ``keys()``, ``len(trace)``. Tensors are
    stored as detached, contiguous CPU copies. ``save``/``load`` use one safetensors file; nothing
    is ever unpickled.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> None:
        if meta is not None and not isinstance(meta, dict):
            raise TraceError(f"trace meta must be a dict, got {type(meta).__name__}")
        self.meta: dict[str, Any] = dict(meta) if meta else {}
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in (tensors or {}).items():
            self.add(name, tensor)

    @classmethod
    def _owned(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Trace:
        """A trace around tensors this module just made (no defensive copy)."""
        trace = cls(meta=meta)
        trace._tensors = tensors
        return trace

    # -- mapping-like access

    def add(self, name: str, tensor: torch.Tensor, *, overwrite: bool = False) -> None:
        """Store a detached, contiguous CPU copy of ``tensor`` under ``name``.

        Raises TraceError if ``name`` is already present, unless ``overwrite=True``.
        """
        _check_name(name)
        if name in self._tensors and not overwrite:
            raise TraceError(f"trace already has a tensor {name!r}; pass overwrite=True to replace it")
        self._tensors[name] = _to_cpu(name, tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            shown = ", ".join(sorted(self._tensors)[:10]) or "none"
            raise TraceError(f"trace has no tensor {name!r} (it has {len(self)}: {shown}...)") from None

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tensor called ``name``, or ``default`` if there is none."""
        return self._tensors.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> KeysView[str]:
        """Tensor names, in insertion order."""
        return self._tensors.keys()

    def values(self) -> ValuesView[torch.Tensor]:
        """Tensors, in insertion order."""
        return self._tensors.values()

    def items(self) -> ItemsView[str, torch.Tensor]:
        """``(name, tensor)`` pairs, in insertion order."""
        return self._tensors.items()

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}: {tuple(t.shape)} {_dtype_name(t.dtype)}" for n, t in list(self.items())[:6])
        more = ", ..." if len(self) > 6 else ""
        return f"Trace({len(self)} tensors{': ' if shown else ''}{shown}{more}; meta keys {sorted(self.meta)})"

    # -- per-layer sites

    def site(self, site: str, layer: int | None = None, call: int = 0) -> torch.Tensor:
        """The tensor recorded at ``site`` in ``layer`` (None: a site outside the layers) on ``call``."""
        return self[site_key(site, layer, call)]

    def has_site(self, site: str, layer: int | None = None, call: int = 0) -> bool:
        return site_key(site, layer, call) in self._tensors

    def rows(self, site: str, call: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions [rows], row_mask [batch, rows])`` of ``site``'s recorded rows on ``call``; None where the
        trace holds no rows for it (a trace not written by a Recorder)."""
        pos, mask = (self._tensors.get(k) for k in rows_keys(site, call))
        if pos is None and mask is None:
            return None
        if pos is None or mask is None:
            raise TraceError(f"trace holds only one of {rows_keys(site, call)}: it is corrupt or was edited by hand")
        return pos, mask

    def sites(self) -> list[str]:
        """The sites the trace holds, sorted: per-layer sites by name (``"attn.probs"``), other tensors by their
        name (``"logits"``); row bookkeeping and later calls (``@n``) left out."""
        found = set()
        for name in self._tensors:
            if name.startswith(("rows.", "rowmask.")):
                continue
            match = _LAYER_RE.match(name)
            found.add((match.group(2) if match else name).split("@")[0])
        return sorted(found)

    def layers(self, site: str) -> list[int]:
        """Sorted layers ``l`` for which a tensor ``"L{l}.{site}"`` exists."""
        found = []
        for name in self._tensors:
            match = _LAYER_RE.match(name)
            if match and match.group(2) == site:
                found.append(int(match.group(1)))
        return sorted(found)

    def stack(self, site: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Tensors ``"L{l}.{site}"`` for ``layers`` (default: all, sorted) stacked on a new dim 0."""
        chosen = self.layers(site) if layers is None else list(layers)
        if not chosen:
            raise TraceError(f"trace has no tensors for site {site!r} (names look like 'L0.{site}')")
        tensors = []
        for layer in chosen:
            name = site_key(site, layer)
            if name not in self._tensors:
                raise TraceError(f"trace has no tensor {name!r}; layers with site {site!r}: {self.layers(site)}")
            tensors.append(self._tensors[name])
        first = tensors[0]
        for layer, tensor in zip(chosen, tensors):
            if tensor.shape != first.shape or tensor.dtype != first.dtype:
                raise TraceError(
                    f"cannot stack site {site!r}: L{chosen[0]} is {tuple(first.shape)} {_dtype_name(first.dtype)} "
                    f"but L{layer} is {tuple(tensor.shape)} {_dtype_name(tensor.dtype)}"
                )
        return torch.stack(tensors, dim=0)

    # -- looking at the image

    def show_image_attention(self, sample: int | str = 0, layer: int | None = None, head: int | None = None,
                             image: Any = None, tokens: Sequence[str] | None = None, ax: Any = None, **kw: Any):
        """Figure of one recorded attention row (``L{layer}.attn.probs``, at the sample's last prompt token unless
        ``position=``) over the sample's image patches, drawn on ``image`` (PIL image or path; None: the grid
        alone) with a colour bar, next to the row over the prompt tokens (labelled by ``tokens``, one string per
        position). ``head=None``: mean over heads; ``layer=None``: mean over layers and heads. ``ax``: only the
        image panel, on that Axes. See :func:`arbiter.overlays.show_image_attention` for the other keywords;
        needs matplotlib. Returns the matplotlib Figure."""
        from .overlays import show_image_attention

        return show_image_attention(self, sample, layer, head, image=image, tokens=tokens, ax=ax, **kw)

    # -- combining

    @classmethod
    def concat(cls, traces: Iterable[Trace], dim: int = 0, list_keys: Sequence[str] = ("sample_ids",)) -> Trace:
        """Concatenate traces tensor by tensor along ``dim`` (the batch dim).

        Meta keys in ``list_keys`` (per-sample lists such as ``"sample_ids"``) are concatenated;
        every other meta key is taken from the first trace. All traces must hold the same names.
        """
        traces = list(traces)
        if not traces:
            raise TraceError("Trace.concat needs at least one trace")
        names = list(traces[0].keys())
        for i, trace in enumerate(traces[1:], start=1):
            if set(trace.keys()) != set(names):
                missing = sorted(set(names) - set(trace.keys()))
                extra = sorted(set(trace.keys()) - set(names))
                raise TraceError(
                    f"cannot concat: trace {i} has different tensor names than trace 0 "
                    f"(missing {missing}, extra {extra})"
                )
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            parts = [trace[name] for trace in traces]
            dtypes = {p.dtype for p in parts}
            if len(dtypes) > 1:
                raise TraceError(f"cannot concat tensor {name!r}: dtypes differ ({sorted(map(_dtype_name, dtypes))})")
            try:
                tensors[name] = torch.cat(parts, dim=dim)
            except (RuntimeError, IndexError) as exc:
                shapes = [tuple(p.shape) for p in parts]
                raise TraceError(f"cannot concat tensor {name!r} along dim {dim}: shapes {shapes}") from exc
        meta = dict(traces[0].meta)
        for key in list_keys:
            present = [key in trace.meta for trace in traces]
            if not any(present):
                continue
            if not all(present) or not all(isinstance(t.meta[key], list) for t in traces):
                raise TraceError(f"cannot concat meta {key!r}: it must be a list in every trace")
            meta[key] = [item for trace in traces for item in trace.meta[key]]
        return cls._owned(tensors, meta)

    # -- disk

    def save(self, path: PathLike) -> None:
        """Write the trace to one safetensors file, atomically (temp file, fsync, rename).

        The meta dict goes as JSON into the header's ``__metadata__`` (keys ``"arbiter_trace"``,
        the format version, ``"meta"`` and ``"tensors_sha256"``, a checksum of the tensors that :meth:`load`
        verifies); TraceError names any value JSON cannot hold. The file gets mode 0666 less the umask.
        """
        path = Path(path)
        header = {"arbiter_trace": str(FORMAT_VERSION), "meta": _dump_meta(self.meta),
                  _CHECKSUM: _tensors_sha256(self._tensors)}
        _atomic_save_tensors(path, dict(self._tensors), header)

    @classmethod
    def load(cls, path: PathLike) -> Trace:
        """Read a trace written by :meth:`save`. Uses safetensors only: arbiter never unpickles.

        Raises TraceError if the file is missing, empty or truncated, not a safetensors file,
        not an arbiter trace, from a newer format version, has corrupt metadata, or its tensors do not match
        the checksum written with them (files saved before traces carried one load unchecked).
        """
        path = Path(path)
        meta, checksum = _read_trace_meta(path)
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError, ...
            raise TraceError(f"trace {path} is corrupt; safetensors could not read it: {exc}") from exc
        if checksum is not None and _tensors_sha256(tensors) != checksum:
            raise TraceError(
                f"trace {path} is corrupt: its tensors do not match the sha256 checksum written with them "
                "(the file was altered or damaged after it was saved); record or copy the trace again"
            )
        return cls._owned(tensors, meta)


def _not_safetensors(path: Path, why: str) -> TraceError:
    return TraceError(
        f"{path} is not a safetensors trace ({why}); arbiter never unpickles files, "
        "so only traces written by Trace.save can be loaded"
    )


def _looks_like(head: bytes) -> str:
    """A hint of what a non-safetensors file is, from its first bytes ('' if unknown)."""
    if head.startswith(b"PK\x03\x04"):
        return "it looks like a zip archive, e.g. from torch.save"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it looks like a pickle"
    return ""


def _unreadable(path: Path, why: str) -> TraceError:
    """What is wrong with a file safetensors refused (``why``: its message), said for a person."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return TraceError(f"cannot read trace {path}: {exc}")
    looks = _looks_like(head)
    if size == 0:
        return TraceError(f"trace {path} is truncated: the file is empty")
    if looks:
        return _not_safetensors(path, looks)
    if size < 8:
        return TraceError(f"trace {path} is truncated: {size} bytes, too short for a safetensors header")
    length = int.from_bytes(head, "little")
    if length <= _MAX_HEADER and length > size - 8:
        return TraceError(f"trace {path} is truncated: its header says {length} bytes but the file holds only "
                          f"{size - 8} after it")
    if "not fully covered" in why:
        return TraceError(f"trace {path} is truncated: its tensors need more data bytes than the file holds")
    return _not_safetensors(path, f"safetensors could not read it: {why}")


def _read_trace_meta(path: Path) -> tuple[dict[str, Any], str | None]:
    """Check ``path`` with safetensors and return the trace meta and the tensors' checksum (None in a file
    written before traces carried one), or raise TraceError."""
    if path.is_dir():
        raise TraceError(f"{path} is a directory; use read_trace_dir() for a TraceWriter directory")
    if not path.exists():
        raise TraceError(f"no trace file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except safetensors.SafetensorError as exc:
        raise _unreadable(path, str(exc)) from None
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc

    if not isinstance(metadata, dict) or "arbiter_trace" not in metadata:
        raise TraceError(
            f"{path} is not an arbiter trace: a safetensors file without the 'arbiter_trace' metadata "
            "(read it with safetensors.torch.load_file, or write it with Trace.save)"
        )
    try:
        version = int(metadata["arbiter_trace"])
    except (TypeError, ValueError):
        raise TraceError(
            f"trace {path} has corrupt metadata: format version {metadata['arbiter_trace']!r} is not an int"
        ) from None
    if version > FORMAT_VERSION:
        raise TraceError(
            f"trace {path} has format version {version}, newer than this arbiter supports "
            f"(up to {FORMAT_VERSION}); upgrade arbiter to read it"
        )
    if version < 1:
        raise TraceError(f"trace {path} has corrupt metadata: format version {version} is not >= 1")
    try:
        meta = json.loads(metadata["meta"])
    except KeyError:
        raise TraceError(f"trace {path} has corrupt metadata: the 'meta' key is missing") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise TraceError(f"trace {path} has corrupt JSON metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise TraceError(f"trace {path} has corrupt JSON metadata: 'meta' is a {type(meta).__name__}, not an object")
    checksum = metadata.get(_CHECKSUM)
    if checksum is not None and not re.fullmatch(r"[0-9a-f]{64}", checksum):
        raise TraceError(f"trace {path} has corrupt metadata: {_CHECKSUM} {checksum!r} is not a sha256 hex digest")
    return meta, checksum


# --------------------------------------------------------------------------- sharded writing


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_index(name: str) -> int:
    match = _SHARD_RE.match(name)
    if match is None:
        raise TraceError(f"{name!r} is not a shard file name")
    return int(match.group(1))


def load_manifest(directory: Path) -> dict[str, Any]:
    """Read and sanity-check ``directory/manifest.json``."""
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{directory} has no {MANIFEST_NAME}: not a TraceWriter directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"manifest {path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise TraceError(f"manifest {path} is corrupt: expected an object with a 'shards' list")
    version = manifest.get("arbiter_trace_dir")
    if not isinstance(version, int) or version < 1:
        raise TraceError(f"manifest {path} is corrupt: bad 'arbiter_trace_dir' version {version!r}")
    if version > MANIFEST_VERSION:
        raise TraceError(
            f"manifest {path} has version {version}, newer than this arbiter supports ({MANIFEST_VERSION}); "
            "upgrade arbiter to read it"
        )
    for entry in manifest["shards"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and _SHARD_RE.match(entry["file"])
            and isinstance(entry.get("sample_ids"), list)
            and isinstance(entry.get("sha256"), str)
        ):
            raise TraceError(f"manifest {path} is corrupt: bad shard entry {entry!r}")
    return manifest


class TraceWriter:
    """Stream per-sample tensors of a long run into ``directory`` as resumable shards.

    Each ``add`` takes a batch (dim 0 of every tensor) with one id per sample. Every
    ``samples_per_shard`` samples a shard ``shard-00000.safetensors`` (a :class:`Trace` file) is
    written atomically, then ``manifest.json`` is atomically updated with the shard's sample ids,
    count and sha256. After a crash, a new writer with ``resume=True`` carries on from the manifest:
    ``done_ids`` lists the samples safely on disk, orphan shards and temp files are deleted.
    ``resume=False`` deletes earlier shards and starts over. One writer per directory at a time.
    """

    def __init__(
        self, directory: PathLike, meta: dict[str, Any], samples_per_shard: int = 64, resume: bool = True
    ) -> None:
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise TraceError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
        if isinstance(meta, dict) and "sample_ids" in meta:
            raise TraceError("writer meta cannot have a 'sample_ids' key: the writer fills it in per shard")
        self.meta: dict[str, Any] = json.loads(_dump_meta(meta, "writer meta"))
        self.directory = Path(directory)
        self.samples_per_shard = samples_per_shard
        self._closed = False
        self._buf_ids: list[str] = []
        self._buf: dict[str, list[torch.Tensor]] = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TraceError(f"cannot create trace directory {self.directory}: {exc}") from exc

        manifest_path = self.directory / MANIFEST_NAME
        if resume and manifest_path.exists():
            manifest = load_manifest(self.directory)
            if manifest.get("meta") != self.meta:
                raise TraceError(
                    f"{self.directory} holds a run with different meta ({manifest.get('meta')!r} vs {self.meta!r}); "
                    "pass resume=False to delete it and start over, or use another directory"
                )
            self._manifest = manifest
        else:
            if not resume:
                manifest_path.unlink(missing_ok=True)
            self._manifest = {"arbiter_trace_dir": MANIFEST_VERSION, "meta": self.meta, "schema": None, "shards": []}
        self._remove_strays()
        for entry in self._manifest["shards"]:
            if not (self.directory / entry["file"]).is_file():
                raise TraceError(
                    f"{self.directory}: shard {entry['file']} listed in {MANIFEST_NAME} is missing; "
                    "pass resume=False to start over"
                )
        self._done: frozenset[str] = frozenset(i for e in self._manifest["shards"] for i in e["sample_ids"])
        self._next_index = 1 + max((_shard_index(e["file"]) for e in self._manifest["shards"]), default=-1)
        if not manifest_path.exists():
            self._write_manifest()

    def _remove_strays(self) -> None:
        """Delete temp files and shards the manifest does not list (left by a crash or a previous run)."""
        listed = {entry["file"] for entry in self._manifest["shards"]}
        for path in self.directory.iterdir():
            name = path.name
            if _TEMP_RE.match(name) or (_SHARD_RE.match(name) and name not in listed):
                path.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        path = self.directory / MANIFEST_NAME
        try:
            atomic_write_text(path, json.dumps(self._manifest, indent=1))
        except OSError as exc:
            raise TraceError(f"cannot write manifest {path}: {exc}") from exc

    @property
    def done_ids(self) -> frozenset[str]:
        """Sample ids already safely on disk (listed in the manifest); callers can skip these."""
        return self._done

    def add(self, sample_ids: Sequence[str], tensors: dict[str, torch.Tensor]) -> None:
        """Buffer one batch: ``tensors[name].shape[0] == len(sample_ids)`` for every tensor.

        Writes a shard each time ``samples_per_shard`` samples are buffered. Raises TraceError for a
        sample id already on disk or buffered, a wrong batch size, or names/dtypes/shapes that differ
        from earlier batches.
        """
        if self._closed:
            raise TraceError(f"TraceWriter for {self.directory} is closed")
        if isinstance(sample_ids, str) or not all(isinstance(i, str) for i in sample_ids):
            raise TraceError("sample_ids must be a list of str (one per sample in the batch)")
        ids = list(sample_ids)
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise TraceError(f"duplicate sample ids in one batch: {dupes[:10]}")
        clash = [i for i in ids if i in self._done]
        if clash:
            raise TraceError(f"sample ids already on disk in {self.directory}: {clash[:10]} (skip ids in done_ids)")
        buffered = set(self._buf_ids)
        clash = [i for i in ids if i in buffered]
        if clash:
            raise TraceError(f"sample ids already added to this writer: {clash[:10]}")
        if not isinstance(tensors, dict):
            raise TraceError(f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
        schema = {}
        for name, tensor in tensors.items():
            _check_name(name)
            if not isinstance(tensor, torch.Tensor):
                raise TraceError(f"tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() == 0 or tensor.shape[0] != len(ids):
                raise TraceError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}; "
                    f"its dim 0 must be the batch of {len(ids)} samples"
                )
            schema[name] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape[1:])}
        expected = self._manifest["schema"]
        if expected is not None and schema != expected:
            raise TraceError(
                f"tensors differ from earlier batches in {self.directory}: expected {expected}, got {schema} "
                "(names, dtypes and per-sample shapes must stay the same; pad variable-length tensors)"
            )
        copies = {name: _to_cpu(name, tensor) for name, tensor in tensors.items()}
        self._manifest["schema"] = schema
        if not ids:
            return
        self._buf_ids.extend(ids)
        for name, tensor in copies.items():
            self._buf.setdefault(name, []).append(tensor)
        while len(self._buf_ids) >= self.samples_per_shard:
            self._write_shard(self.samples_per_shard)

    def _write_shard(self, count: int) -> None:
        """Write the first ``count`` buffered samples as a shard, then record it in the manifest."""
        joined = {name: torch.cat(parts) if len(parts) > 1 else parts[0] for name, parts in self._buf.items()}
        ids = self._buf_ids[:count]
        name = shard_name(self._next_index)
        path = self.directory / name
        shard = Trace._owned({k: t[:count] for k, t in joined.items()}, {**self.meta, "sample_ids": ids})
        shard.save(path)
        entry = {"file": name, "count": count, "sample_ids": ids, "sha256": _sha256(path)}
        self._manifest["shards"].append(entry)
        try:
            self._write_manifest()
        except BaseException:
            self._manifest["shards"].pop()
            path.unlink(missing_ok=True)
            raise
        self._next_index += 1
        self._done = self._done | set(ids)
        self._buf_ids = self._buf_ids[count:]
        self._buf = {k: [t[count:].clone()] if self._buf_ids else [] for k, t in joined.items()}

    def flush(self) -> None:
        """Write whatever is buffered as a (possibly smaller) shard."""
        if self._buf_ids:
            self._write_shard(len(self._buf_ids))

    def close(self) -> None:
        """Flush the buffer and stop accepting samples. Safe to call twice."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # buffered samples are whole, so they are kept even when the block raised


def _verified_shards(directory: Path) -> tuple[dict[str, Any], Iterator[Trace]]:
    manifest = load_manifest(directory)

    def shards() -> Iterator[Trace]:
        for entry in manifest["shards"]:
            path = directory / entry["file"]
            if not path.is_file():
                raise TraceError(f"shard {entry['file']} listed in {directory / MANIFEST_NAME} is missing")
            if _sha256(path) != entry["sha256"]:
                raise TraceError(
                    f"shard {entry['file']} in {directory} is corrupt: its sha256 does not match the manifest"
                )
            trace = Trace.load(path)
            if trace.meta.get("sample_ids") != entry["sample_ids"]:
                raise TraceError(f"shard {entry['file']} in {directory} holds other sample ids than the manifest lists")
            yield trace

    return manifest, shards()


def iter_trace_dir(directory: PathLike) -> Iterator[Trace]:
    """Yield one :class:`Trace` per shard of a TraceWriter directory, in manifest order.

    Each shard's sha256 is checked before it is loaded; only one shard is in memory at a time.
    """
    _, shards = _verified_shards(Path(directory))
    return shards


def read_trace_dir(directory: PathLike) -> Trace:
    """All shards of a TraceWriter directory concatenated (sha256-checked) into one :class:`Trace`.

    Its meta is the writer's meta plus ``"sample_ids"`` in order.
    """
    manifest, shards = _verified_shards(Path(directory))
    traces = list(shards)
    if not traces:
        return Trace(meta={**manifest.get("meta", {}), "sample_ids": []})
    return Trace.concat(traces)

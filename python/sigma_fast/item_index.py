"""ItemIndex: item embeddings grouped by SID prefix, the catalog that ``apf_fuse`` searches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import reference
from ._backends import load_core
from ._checks import as_id_tensor, as_tensor, check_alloc, check_dtype, check_int, dtype_name
from ._io import Field, atomic_write_bytes, atomic_write_json, load_tensors, read_artifact_config

FORMAT = "sigma_fast.ItemIndex"
FORMAT_VERSION = 1
TENSORS_FILE = "item_index.safetensors"
CONFIG_FILE = "item_index.json"
_MAX_KEY = 2**62  # mixed-radix prefix keys must stay below this
_FIELDS = {"num_items": Field("int", lo=1), "dim": Field("int", lo=1),
           "num_buckets": Field("int", lo=1), "prefix_levels": Field("int", lo=0),
           "id_bound": Field("int", lo=1), "tensors_sha256": Field("sha256")}


@dataclass
class IndexStats:
    """Bucket size statistics of an ItemIndex.

    num_items, num_buckets, empty_buckets (how many buckets hold no item), largest_bucket (its
    size) and largest_bucket_id; mean_bucket_size over non-empty buckets; percentiles
    {"p50", "p90", "p99", "p99.9"} of the sizes of non-empty buckets; items_in_largest_1pct:
    the share of items held by the largest 1% of buckets (1 = one giant bucket).
    """

    num_items: int
    num_buckets: int
    empty_buckets: int
    largest_bucket: int
    largest_bucket_id: int
    mean_bucket_size: float
    percentiles: dict
    items_in_largest_1pct: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _prefix_keys(codes: np.ndarray, radix: np.ndarray) -> np.ndarray:
    """Mixed-radix key of each prefix row: lexicographic order of rows == numeric key order."""
    keys = np.zeros(codes.shape[:-1], dtype=np.int64)
    for level in range(codes.shape[-1]):
        keys = keys * radix[level] + codes[..., level]
    return keys


def _radix_of(prefixes: np.ndarray) -> np.ndarray:
    radix = prefixes.max(axis=0).astype(np.int64) + 1
    if float(np.prod(radix.astype(np.float64))) >= _MAX_KEY:
        raise ValueError(
            f"prefix_codes span {radix.tolist()} values per level, too many to combine into one "
            f"key; map the prefixes to bucket ids yourself and pass 1-d prefix_codes")
    return radix


class ItemIndex:
    """Item embeddings grouped by SID prefix: rows L2-normalised, stored bucket-contiguous.

    >>> index = ItemIndex(item_emb, codes[:, 0])          # buckets = first SID level
    >>> index = ItemIndex(item_emb, codes[:, :2])         # buckets = distinct 2-level prefixes
    >>> prefix_ids = index.bucket_of(beam_tokens)          # [B, K, 2] -> [B, K] bucket ids
    >>> index.stats().empty_buckets, index.bucket_sizes()
    >>> index.save("idx"); index = ItemIndex.load("idx").to("cuda")

    Args:
        embeddings: float32 [N, D] (torch tensor on any device, or NumPy), N >= 1. Rows must be
            finite and non-zero; they are normalised to unit length.
        prefix_codes: int32/int64, non-negative. [N]: the bucket id of each item (e.g. its
            first SID code); ``num_buckets`` defaults to max + 1, and codes without items are
            empty buckets. [N, l]: an l-level prefix per item; the buckets are the distinct
            prefixes present, numbered in lexicographic order (``index.prefixes[u]`` is bucket
            u's prefix; ``index.bucket_of(prefix)`` maps prefixes to bucket ids).
        item_ids: int32/int64 [N], unique and >= 0, the caller's id of each item (default
            ``arange(N)``). ``apf_fuse`` returns these ids, breaks ties by them, and indexes
            allowed-item masks by them (masks have length ``index.id_bound`` = max id + 1).
        num_buckets: total number of buckets for 1-d ``prefix_codes`` (> max code).

    Layout (every backend reads these tensors; see csrc/item_index.h):
        embeddings float32 [N, D]: normalised rows, bucket u in rows offsets[u]:offsets[u+1],
            stable in input order within a bucket; offsets int64 [U + 1]; item_ids int64 [N]:
            the caller id of each storage row; positions int64 [N]: the storage row of input
            item i (so ``embeddings[positions[i]]`` is item i's normalised row).

    Built by the C++ core (the NumPy reference when the core is unavailable), on the CPU; an
    index built from CUDA embeddings is moved back to their device.

    Edits. The tensors above may be edited in place or replaced only so that the result is
    again a valid index of this layout (e.g. an item's row replaced by another unit-norm row).
    ``apf_fuse`` notices any torch in-place edit or replaced tensor attribute at its next call
    (tensor version counters: a constant-time test) and then re-validates the whole index once
    with :meth:`validate`, which raises ValueError naming the first violation (non-finite or
    non-unit rows, negative or repeated ids, ids whose max + 1 is not ``id_bound``, offsets,
    positions or prefixes out of order). Writes that bypass torch (through a NumPy view or a raw
    pointer) are invisible to that test: call ``index.validate()`` after them.
    """

    embeddings: torch.Tensor
    offsets: torch.Tensor
    item_ids: torch.Tensor
    positions: torch.Tensor
    prefixes: torch.Tensor | None

    def __init__(self, embeddings, prefix_codes, *, item_ids=None, num_buckets=None):
        emb_t, _ = as_tensor(embeddings, "embeddings")
        codes_t, _ = as_tensor(prefix_codes, "prefix_codes")
        check_dtype(emb_t, "embeddings", (torch.float32,))
        if emb_t.dim() != 2 or emb_t.shape[0] < 1 or emb_t.shape[1] < 1:
            raise ValueError(f"embeddings must be 2-d [N, D] with N >= 1 and D >= 1; got shape "
                             f"{list(emb_t.shape)}")
        n = emb_t.shape[0]
        check_dtype(codes_t, "prefix_codes", (torch.int32, torch.int64))
        if codes_t.dim() not in (1, 2) or codes_t.shape[0] != n or (
                codes_t.dim() == 2 and codes_t.shape[1] < 1):
            raise ValueError(f"prefix_codes must be [N] or [N, l] with N = {n} (embeddings' "
                             f"rows) and l >= 1; got shape {list(codes_t.shape)}")
        codes = codes_t.detach().cpu().numpy().astype(np.int64, copy=False)
        if codes.min() < 0:
            where = np.argwhere(codes < 0)[0].tolist()
            raise ValueError(f"prefix_codes must be >= 0; got {codes[tuple(where)]} at index "
                             f"{where}")
        prefixes = None
        if codes.ndim == 1:
            top = int(codes.max())
            if num_buckets is None:
                num_buckets = top + 1
            num_buckets = check_int(num_buckets, "num_buckets", 1)
            check_alloc(8 * (num_buckets + 1), f"num_buckets={num_buckets} (1-d prefix_codes "
                        f"are bucket ids in [0, num_buckets); the largest is {top}): the int64 "
                        f"[num_buckets + 1] bucket offsets")
            if num_buckets <= top:
                raise ValueError(f"num_buckets must be > every prefix code ({top}); got "
                                 f"{num_buckets}")
            buckets = codes
        else:
            if num_buckets is not None:
                raise ValueError("num_buckets applies to 1-d prefix_codes only; with [N, l] "
                                 "prefixes the buckets are the distinct prefixes present")
            radix = _radix_of(codes)
            keys, first, buckets = np.unique(_prefix_keys(codes, radix), return_index=True,
                                             return_inverse=True)
            buckets = buckets.reshape(-1).astype(np.int64)
            num_buckets = len(keys)
            prefixes = torch.from_numpy(np.ascontiguousarray(codes[first]))
        ids = None
        if item_ids is not None:
            ids_t = as_id_tensor(item_ids, "item_ids")
            check_dtype(ids_t, "item_ids", (torch.int32, torch.int64))
            if list(ids_t.shape) != [n]:
                raise ValueError(f"item_ids must be 1-d [N] with N = {n}; got shape "
                                 f"{list(ids_t.shape)}")
            ids = np.ascontiguousarray(ids_t.detach().cpu().numpy(), dtype=np.int64)
            _check_ids(ids, "item_ids")
        emb = emb_t.detach().cpu().numpy()
        core = load_core()
        if core is not None:
            if emb.shape[1] > 1 and emb.strides[1] != 4:
                emb = np.ascontiguousarray(emb)
            out_emb = np.empty(emb.shape, dtype=np.float32)
            offsets = np.empty(num_buckets + 1, dtype=np.int64)
            out_ids = np.empty(n, dtype=np.int64)
            positions = np.empty(n, dtype=np.int64)
            core.item_index_build(emb, np.ascontiguousarray(buckets), num_buckets, ids, out_emb,
                                  offsets, out_ids, positions)
        else:
            out_emb, offsets, out_ids, positions = reference.build_item_index(
                emb, buckets, num_buckets, ids)
        device = emb_t.device
        self._set(torch.from_numpy(out_emb).to(device), torch.from_numpy(offsets).to(device),
                  torch.from_numpy(out_ids).to(device), torch.from_numpy(positions).to(device),
                  None if prefixes is None else prefixes.to(device),
                  id_bound=int(out_ids.max()) + 1)

    def _set(self, embeddings, offsets, item_ids, positions, prefixes, *, id_bound):
        self.embeddings = embeddings
        self.offsets = offsets
        self.item_ids = item_ids
        self.positions = positions
        self.prefixes = prefixes
        self.id_bound = int(id_bound)
        self._radix = None if prefixes is None else _radix_of(prefixes.cpu().numpy())
        self._keys = None if prefixes is None else _prefix_keys(prefixes.cpu().numpy(),
                                                               self._radix)
        self._seen = self._state()

    def _tensors(self) -> tuple:
        return (self.embeddings, self.offsets, self.item_ids, self.positions, self.prefixes)

    def _state(self) -> tuple:
        """The identity and version counter of every tensor and the id bound: any torch
        in-place edit or replaced attribute changes it."""
        return tuple((t, -1 if t is None else t._version) for t in self._tensors()) \
            + (self.id_bound,)

    def _edited(self) -> bool:
        seen, now = self._seen, self._state()
        return any(a[0] is not b[0] or a[1] != b[1] for a, b in zip(seen[:-1], now[:-1])) \
            or seen[-1] != now[-1]

    def validate(self) -> "ItemIndex":
        """Check every invariant of the layout (see the class docstring) on the current
        tensors, raising ValueError naming the first violation; on success the index is
        marked valid (``apf_fuse`` then trusts it until the next edit). Reads every tensor
        (a device-to-host copy for an index on a GPU). Returns self."""
        where = "ItemIndex"
        t = {"embeddings": self.embeddings, "offsets": self.offsets,
             "item_ids": self.item_ids, "positions": self.positions}
        if self.prefixes is not None:
            t["prefixes"] = self.prefixes
        for name, v in t.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{where}: {name} must be a torch.Tensor; got "
                                 f"{type(v).__name__}")
            if v.device != self.embeddings.device:
                raise ValueError(f"{where}: {name} must be on the embeddings' device "
                                 f"({self.embeddings.device}); got {v.device}")
        emb = self.embeddings
        if emb.dtype not in (torch.float32, torch.float16, torch.bfloat16) or emb.dim() != 2 \
                or emb.shape[0] < 1:
            raise ValueError(f"{where}: embeddings must be float32 (or float16 / bfloat16 on "
                             f"CUDA) [N >= 1, D]; got {dtype_name(emb.dtype)} "
                             f"{list(emb.shape)}")
        n = emb.shape[0]
        u = self.offsets.shape[0] - 1 if self.offsets.dim() == 1 else -1
        expected = {"offsets": [max(u, 0) + 1], "item_ids": [n], "positions": [n]}
        if self.prefixes is not None:
            expected["prefixes"] = [u, self.prefix_levels]
        for name, shape in expected.items():
            if t[name].dtype != torch.int64 or list(t[name].shape) != shape or u < 1:
                raise ValueError(f"{where}: {name} must be int64 {shape} (offsets [U + 1], "
                                 f"U >= 1); got {dtype_name(t[name].dtype)} "
                                 f"{list(t[name].shape)}")
        host = {k: v.detach().cpu().contiguous() for k, v in t.items()}
        host["embeddings"] = host["embeddings"].float()
        _verify_layout(host, n, self.id_bound, where,
                       norm_tol=1e-4 if emb.dtype == torch.float32 else 1e-2)
        self._set(*self._tensors(), id_bound=self.id_bound)
        return self

    def _revalidate_if_edited(self) -> None:
        if self._edited():
            self.validate()

    @classmethod
    def _from_tensors(cls, embeddings, offsets, item_ids, positions, prefixes, *, id_bound):
        self = cls.__new__(cls)
        self._set(embeddings, offsets, item_ids, positions, prefixes, id_bound=id_bound)
        return self

    # ------------------------------------------------------------------ shape facts
    @property
    def num_items(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_buckets(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def prefix_levels(self) -> int:
        """l for an index built from [N, l] prefixes; 0 when built from 1-d bucket ids."""
        return 0 if self.prefixes is None else int(self.prefixes.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def __repr__(self) -> str:
        return (f"ItemIndex(num_items={self.num_items}, dim={self.dim}, num_buckets="
                f"{self.num_buckets}, prefix_levels={self.prefix_levels}, device={self.device})")

    def to(self, device, dtype: torch.dtype | None = None) -> "ItemIndex":
        """A copy with every tensor on ``device`` (self when nothing changes). ``dtype`` may store
        the embeddings as float16 or bfloat16 on a CUDA device (the cuda backend of ``apf_fuse``
        reads them and accumulates in float32; the other backends need float32)."""
        device = torch.device(device)
        dtype = self.embeddings.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
        if dtype != torch.float32 and device.type != "cuda":
            raise ValueError(f"float16/bfloat16 embeddings are for CUDA devices; got {device}")
        self._revalidate_if_edited()  # a copy must not launder an invalid edit
        if device == self.device and dtype == self.embeddings.dtype:
            return self
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return ItemIndex._from_tensors(self.embeddings.to(device, dtype), move(self.offsets),
                                       move(self.item_ids), move(self.positions),
                                       move(self.prefixes), id_bound=self.id_bound)

    # ---------------------------------------------------------------------- lookups
    def bucket_of(self, prefix):
        """Bucket ids of prefixes: int [..., l] for an index built from l-level prefixes, int
        [...] codes for one built from 1-d bucket ids. Prefixes (codes) the index does not
        hold map to -1 (give those beams score -inf in ``apf_fuse``). Returns int64 [...] of
        the input's kind and device."""
        p_t, was_numpy = as_tensor(prefix, "prefix")
        check_dtype(p_t, "prefix", (torch.int32, torch.int64))
        self._revalidate_if_edited()
        p = p_t.detach().cpu().numpy().astype(np.int64, copy=False)
        if self.prefixes is None:
            out = np.where((p >= 0) & (p < self.num_buckets), p, -1)
        else:
            levels = self.prefix_levels
            if p.ndim < 1 or p.shape[-1] != levels:
                raise ValueError(f"prefix must be [..., {levels}] (this index holds {levels}-level "
                                 f"prefixes); got shape {list(p.shape)}")
            inside = ((p >= 0) & (p < self._radix)).all(axis=-1)
            keys = _prefix_keys(np.where(inside[..., None], p, 0), self._radix)
            pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            out = np.where(inside & (self._keys[pos] == keys), pos, -1)
        out_t = torch.from_numpy(np.ascontiguousarray(out, dtype=np.int64)).to(p_t.device)
        return out_t.numpy() if was_numpy else out_t

    def bucket_sizes(self) -> torch.Tensor:
        """int64 [num_buckets]: items per bucket (on the index's device)."""
        return self.offsets[1:] - self.offsets[:-1]

    def bucket_items(self, bucket: int) -> torch.Tensor:
        """Caller item ids of one bucket, in storage order."""
        bucket = check_int(bucket, "bucket", 0)
        if bucket >= self.num_buckets:
            raise IndexError(f"bucket must lie in [0, {self.num_buckets}); got {bucket}")
        lo, hi = (int(v) for v in self.offsets[bucket:bucket + 2])
        return self.item_ids[lo:hi]

    def stats(self) -> IndexStats:
        sizes = self.bucket_sizes().cpu().numpy()
        nonempty = sizes[sizes > 0]
        by_size = np.sort(sizes)[::-1]
        top = max(1, int(np.ceil(0.01 * len(sizes))))
        return IndexStats(
            num_items=self.num_items,
            num_buckets=self.num_buckets,
            empty_buckets=int((sizes == 0).sum()),
            largest_bucket=int(sizes.max()),
            largest_bucket_id=int(np.argmax(sizes)),
            mean_bucket_size=float(nonempty.mean()),
            percentiles={f"p{q:g}": float(np.percentile(nonempty, q)) for q in (50, 90, 99, 99.9)},
            items_in_largest_1pct=float(by_size[:top].sum() / self.num_items),
        )

    # ------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``item_index.safetensors`` and ``item_index.json`` into ``directory``, each
        replaced atomically; the JSON records the tensor file's SHA-256, so a reader never
        pairs one save's config with another's tensors."""
        self._revalidate_if_edited()
        directory = Path(directory)
        tensors = {"embeddings": self.embeddings, "offsets": self.offsets,
                   "item_ids": self.item_ids, "positions": self.positions}
        if self.prefixes is not None:
            tensors["prefixes"] = self.prefixes
        from safetensors.torch import save

        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"format": FORMAT})
        atomic_write_bytes(directory / TENSORS_FILE, blob)
        atomic_write_json(directory / CONFIG_FILE, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_items": self.num_items,
            "dim": self.dim,
            "num_buckets": self.num_buckets,
            "prefix_levels": self.prefix_levels,
            "id_bound": self.id_bound,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        })
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device=None) -> "ItemIndex":
        """Read an index written by ``save`` (onto ``device``, default CPU), verifying the
        checksum, tensor names, dtypes and shapes, the layout invariants and unit-norm rows."""
        directory, cfg_path, config = read_artifact_config(
            directory, CONFIG_FILE, FORMAT, FORMAT_VERSION, "an item index", _FIELDS)
        tensors = load_tensors(directory / TENSORS_FILE, sha256=config["tensors_sha256"],
                               config_path=cfg_path)
        t_path = directory / TENSORS_FILE
        n, d, u = (config[k] for k in ("num_items", "dim", "num_buckets"))
        levels, id_bound = config["prefix_levels"], config["id_bound"]
        expected = {"embeddings": (torch.float32, [n, d]), "offsets": (torch.int64, [u + 1]),
                    "item_ids": (torch.int64, [n]), "positions": (torch.int64, [n])}
        if levels:
            expected["prefixes"] = (torch.int64, [u, levels])
        if sorted(tensors) != sorted(expected):
            raise ValueError(f"{t_path}: expected tensors {sorted(expected)}; got "
                             f"{sorted(tensors)}")
        for name, (dtype, shape) in expected.items():
            t = tensors[name]
            if t.dtype != dtype or list(t.shape) != shape:
                raise ValueError(f"{t_path}: {name} must be {dtype_name(dtype)} {shape} (from "
                                 f"{CONFIG_FILE}); got {dtype_name(t.dtype)} {list(t.shape)}")
        _verify_layout(tensors, n, id_bound, str(t_path))
        index = cls._from_tensors(tensors["embeddings"], tensors["offsets"], tensors["item_ids"],
                                  tensors["positions"], tensors.get("prefixes"),
                                  id_bound=id_bound)
        return index.to(device) if device is not None else index


def _check_ids(ids: np.ndarray, name: str) -> None:
    if len(ids) and ids.min() < 0:
        i = int(np.argmin(ids))
        raise ValueError(f"{name} must be >= 0; got {ids[i]} at index {i}")
    s = np.sort(ids)
    dup = np.nonzero(s[1:] == s[:-1])[0]
    if len(dup):
        raise ValueError(f"{name} must be unique; got {s[dup[0]]} more than once")


def _verify_layout(t: dict, n: int, id_bound: int, where: str, *,
                   norm_tol: float = 1e-4) -> None:
    off = t["offsets"].numpy()
    if off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any():
        raise ValueError(f"{where}: offsets must start at 0, be non-decreasing and end at {n}")
    ids = t["item_ids"].numpy()
    _check_ids(ids, f"{where}: item_ids")
    if n and int(ids.max()) + 1 != id_bound:
        raise ValueError(f"{where}: item_ids must have max + 1 = id_bound = {id_bound}; got "
                         f"{int(ids.max()) + 1}")
    pos = t["positions"].numpy()
    if not np.array_equal(np.sort(pos), np.arange(n)):
        raise ValueError(f"{where}: positions must be a permutation of 0..{n - 1}")
    emb = t["embeddings"]
    norms = torch.linalg.vector_norm(emb, dim=1)
    bad = ~torch.isfinite(norms) | ((norms - 1.0).abs() > norm_tol)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"{where}: embeddings must be finite unit-norm rows; row {row} has norm "
                         f"{float(norms[row]):.6g}")
    if "prefixes" in t:
        p = t["prefixes"].numpy()
        if (p < 0).any():
            raise ValueError(f"{where}: prefixes must be >= 0")
        keys = _prefix_keys(p, _radix_of(p)) if len(p) else p[:, 0]
        if (np.diff(keys) <= 0).any():
            raise ValueError(f"{where}: prefixes must be distinct and in lexicographic order")

"""PrefixTrie: the catalog's semantic-ID codes as a flat, device-movable prefix trie.

Built once in C++ (``csrc/trie_cpu.cpp``; plain-Python reference in
``sigma_fast.reference.trie``), queried from Python, and passed as tensors to the constrained
beam step (``sigma_fast.constrained_beam_step``) and to future GPU kernels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from . import reference
from ._backends import load_core
from ._checks import (
    as_id_tensor,
    as_tensor,
    check_alloc,
    check_dtype,
    check_index_range,
    check_int,
    check_mask,
    check_rank,
    dtype_name,
    to_output,
)
from ._io import (Field, atomic_save_tensors, atomic_write_json, check_sha256,
                  read_artifact_config)

FORMAT = "sigma_fast.PrefixTrie"
FORMAT_VERSION = 1
TENSORS_FILE = "trie.safetensors"
CONFIG_FILE = "trie_config.json"

# The flat arrays, all int64 (see the PrefixTrie docstring); child_nodes is not stored on disk
# (it is arange(1, num_nodes)).
ARRAYS = ("level_offsets", "child_offsets", "child_tokens", "child_nodes", "node_parent",
          "item_begin", "item_end", "item_perm", "root_children")
_SAVED = tuple(a for a in ARRAYS if a != "child_nodes")
_FIELDS = {"num_items": Field("int", lo=1), "num_levels": Field("int", lo=1),
           "num_nodes": Field("int", lo=1), "codebook_size": Field("int", lo=1),
           "item_id_bound": Field("int", lo=1),
           "nodes_per_level": Field("list", items="int", optional=True),
           "tensors_sha256": Field("sha256")}


def _check_nonnegative(t: torch.Tensor, name: str) -> None:
    if t.numel() and int(t.min()) < 0:
        where = (t < 0).nonzero()[0].tolist()
        raise IndexError(f"{name} must be >= 0; got {t[tuple(where)].item()} at index {where}")


def _check_unique(ids: torch.Tensor, name: str) -> None:
    s = np.sort(ids.numpy())
    dup = np.nonzero(s[1:] == s[:-1])[0]
    if len(dup):
        raise ValueError(f"{name} must be unique (one id per item); got {int(s[dup[0]])} "
                         f"{int((s == s[dup[0]]).sum())} times")


def _codes_tensor(codes) -> torch.Tensor:
    if isinstance(codes, (list, tuple)):
        try:
            codes = np.array(codes)
        except ValueError as exc:
            raise ValueError(f"codes must be a rectangular [N, L] integer array; got a ragged "
                             f"sequence ({exc})") from exc
        if codes.dtype == object:
            raise ValueError("codes must be a rectangular [N, L] integer array; got a ragged "
                             "sequence")
        if codes.dtype.kind in "iu":
            codes = codes.astype(np.int64)
    if isinstance(codes, np.ndarray) and codes.dtype == object:
        raise TypeError("codes must be an int32 or int64 [N, L] array; got dtype object (ragged "
                        "rows?)")
    t, _ = as_tensor(codes, "codes")
    check_dtype(t, "codes", (torch.int32, torch.int64))
    check_rank(t, "codes", 2, "[N, L]")
    if t.shape[0] == 0:
        raise ValueError(f"codes must have at least one row (an empty catalog has no trie); got "
                         f"shape {list(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"codes must have at least one level; got shape {list(t.shape)}")
    t = t.detach().cpu()
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


class PrefixTrie:
    """A prefix trie over item codes, stored as flat int64 arrays.

    ``PrefixTrie(codes, *, item_ids=None, codebook_size=None)``

    Args:
        codes: int32 or int64 [N, L] (NumPy or torch; any row order; several rows may share a
            full code, e.g. before deduplication — they all sit under one leaf).
        item_ids: int [N], the caller's id of each row (>= 0, unique); default ``arange(N)``.
            Item masks (``allowed_nodes``) are indexed by these ids.
        codebook_size: K; every code must lie in [0, K). Default: the largest code + 1. The
            constrained beam step takes logits over exactly K codes. The trie keeps a dense
            int64 [K] table of the root's children, so 8 K bytes must fit in memory.

    Layout. Rows are sorted by code (stable: equal codes keep row order). Node ids go level by
    level: root = 0, then the depth-1 nodes in token order, the depth-2 nodes in (parent,
    token) order, ... So the children of a node are consecutive ids and CSR slot ``e`` holds
    node ``e + 1``. Read-only int64 tensors on ``self.device``:

    ===================  ==============  ===============================================
    ``level_offsets``    [L + 2]         depth-d nodes are ids [lo[d], lo[d + 1])
    ``child_offsets``    [nodes + 1]     node n's children are slots [co[n], co[n + 1])
    ``child_tokens``     [nodes - 1]     token of each slot (ascending within a node)
    ``child_nodes``      [nodes - 1]     node of each slot (= slot + 1)
    ``node_parent``      [nodes]         parent of each node (-1 for the root)
    ``item_begin/end``   [nodes]         items below a node: sorted positions [begin, end)
    ``item_perm``        [N]             sorted position -> caller's item id
    ``root_children``    [K]             dense first level: node of token k, or -1
    ===================  ==============  ===============================================

    Every node has at least one item below it, and the nodes of one depth partition the sorted
    positions [0, N) in id order.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, codes, *, item_ids=None, codebook_size: int | None = None):
        codes_t = _codes_tensor(codes)
        n, levels = codes_t.shape
        arr = codes_t.numpy()  # NumPy reductions: single-threaded, no thread-pool wake-up
        lo, hi = int(arr.min()), int(arr.max())
        if codebook_size is None:
            if lo < 0:
                _check_nonnegative(codes_t, "codes")
            codebook_size = hi + 1
            check_alloc(8 * codebook_size, f"codes up to {hi} (codebook_size = {hi + 1}): the "
                        f"trie's int64 [codebook_size] root table")
        else:
            codebook_size = check_int(codebook_size, "codebook_size", 1)
            check_alloc(8 * codebook_size, f"codebook_size={codebook_size}: the trie's int64 "
                        f"[codebook_size] root table")
            if lo < 0 or hi >= codebook_size:
                check_index_range(codes_t, "codes", codebook_size)
        core = load_core()
        if core is not None:
            arrays = core.trie_build(arr, codebook_size)
        else:
            arrays = reference.build_trie(arr, codebook_size)
        tensors = {name: torch.from_numpy(np.asarray(arrays[name])) for name in ARRAYS}
        id_bound = n
        if item_ids is not None:
            ids = as_id_tensor(item_ids, "item_ids")
            check_dtype(ids, "item_ids", (torch.int32, torch.int64))
            if ids.dim() != 1 or ids.shape[0] != n:
                raise ValueError(f"item_ids must be 1-d [N] with N = {n} (codes' rows); got shape "
                                 f"{list(ids.shape)}")
            ids = ids.detach().cpu().to(torch.int64)
            _check_nonnegative(ids, "item_ids")
            _check_unique(ids, "item_ids")
            tensors["item_perm"] = ids[tensors["item_perm"]]
            id_bound = int(ids.max()) + 1
        self._init(tensors, num_items=n, num_levels=levels, codebook_size=codebook_size,
                   item_id_bound=id_bound)

    def _init(self, tensors: dict, *, num_items: int, num_levels: int, codebook_size: int,
              item_id_bound: int, host: "PrefixTrie | None" = None) -> None:
        self._t = dict(tensors)
        self._num_items = num_items
        self._num_levels = num_levels
        self._codebook_size = codebook_size
        self._item_id_bound = item_id_bound
        self._host = host  # the CPU copy that answers host-side queries, None if self is on CPU

    @classmethod
    def _from_arrays(cls, tensors: dict, *, num_items: int, num_levels: int, codebook_size: int,
                     item_id_bound: int, host: "PrefixTrie | None" = None) -> "PrefixTrie":
        trie = cls.__new__(cls)
        trie._init(tensors, num_items=num_items, num_levels=num_levels,
                   codebook_size=codebook_size, item_id_bound=item_id_bound, host=host)
        return trie

    def _meta(self) -> dict:
        return dict(num_items=self._num_items, num_levels=self._num_levels,
                    codebook_size=self._codebook_size, item_id_bound=self._item_id_bound)

    # --------------------------------------------------------------------- arrays
    level_offsets = property(lambda self: self._t["level_offsets"])
    child_offsets = property(lambda self: self._t["child_offsets"])
    child_tokens = property(lambda self: self._t["child_tokens"])
    child_nodes = property(lambda self: self._t["child_nodes"])
    node_parent = property(lambda self: self._t["node_parent"])
    item_begin = property(lambda self: self._t["item_begin"])
    item_end = property(lambda self: self._t["item_end"])
    item_perm = property(lambda self: self._t["item_perm"])
    root_children = property(lambda self: self._t["root_children"])

    # ---------------------------------------------------------------------- facts
    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def num_levels(self) -> int:
        return self._num_levels

    @property
    def num_nodes(self) -> int:
        return int(self._t["child_offsets"].shape[0]) - 1

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def item_id_bound(self) -> int:
        """Length of an item mask: the largest item id + 1 (N with the default ids)."""
        return self._item_id_bound

    @property
    def device(self) -> torch.device:
        return self._t["child_offsets"].device

    @property
    def nodes_per_level(self) -> list[int]:
        """Number of nodes at each depth 0 (the root) .. L."""
        return torch.diff(self._cpu("level_offsets")).tolist()

    def level_range(self, depth: int) -> tuple[int, int]:
        """Node ids [lo, hi) of the nodes at ``depth`` (0 = root .. L = leaves)."""
        depth = check_int(depth, "depth", 0)
        if depth > self._num_levels:
            raise ValueError(f"depth must be <= {self._num_levels} (num_levels); got {depth}")
        lo = self._cpu("level_offsets")
        return int(lo[depth]), int(lo[depth + 1])

    def stats(self) -> dict:
        """Shape and branching statistics: counts, nodes per depth, children per node at each
        depth 0 .. L-1 (mean / min / max), and how many items share a leaf."""
        lo = self._cpu("level_offsets").tolist()
        fanout = torch.diff(self._cpu("child_offsets"))
        items = self._cpu("item_end") - self._cpu("item_begin")
        leaves = items[lo[-2]:lo[-1]]
        per_depth = [fanout[lo[d]:lo[d + 1]].double() for d in range(self._num_levels)]
        return {
            "num_items": self._num_items,
            "num_levels": self._num_levels,
            "num_nodes": self.num_nodes,
            "codebook_size": self._codebook_size,
            "nodes_per_level": self.nodes_per_level,
            "mean_children": [float(f.mean()) for f in per_depth],
            "min_children": [int(f.min()) for f in per_depth],
            "max_children": [int(f.max()) for f in per_depth],
            "distinct_codes": int(leaves.numel()),
            "max_items_per_leaf": int(leaves.max()),
            "shared_leaves": int((leaves > 1).sum()),
        }

    def __repr__(self) -> str:
        return (f"PrefixTrie(num_items={self._num_items}, num_levels={self._num_levels}, "
                f"codebook_size={self._codebook_size}, num_nodes={self.num_nodes}, "
                f"device={self.device})")

    # -------------------------------------------------------------------- devices
    def _cpu(self, name: str) -> torch.Tensor:
        return (self._host or self)._t[name]

    def to(self, device) -> "PrefixTrie":
        """The same trie with its arrays on ``device`` (self when already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        host = self._host or self
        if device.type == "cpu":
            return host
        tensors = {k: v.to(device) for k, v in host._t.items()}
        return PrefixTrie._from_arrays(tensors, host=host, **self._meta())

    # -------------------------------------------------------------------- queries
    def walk(self, tokens):
        """Follow token sequences from the root.

        Args:
            tokens: int32 or int64 [B, l] with l <= L (NumPy or torch).
        Returns: int64 [B], the node reached by each row, or -1 where the path does not exist
            (of the input's kind and device).
        """
        t, was_numpy = as_tensor(tokens, "tokens")
        check_dtype(t, "tokens", (torch.int32, torch.int64))
        check_rank(t, "tokens", 2, "[B, l]")
        if t.shape[1] > self._num_levels:
            raise ValueError(f"tokens must have at most L = {self._num_levels} columns; got "
                             f"shape {list(t.shape)}")
        host = t.detach().cpu()
        if host.shape[1] > 1 and host.stride(1) != 1:
            host = host.contiguous()
        core = load_core()
        co, ct, cn = (self._cpu(n) for n in ("child_offsets", "child_tokens", "child_nodes"))
        if core is not None:
            out = torch.empty((host.shape[0],), dtype=torch.int64)
            core.trie_walk(host.numpy(), co.numpy(), ct.numpy(), cn.numpy(), out.numpy())
        else:
            out = torch.from_numpy(reference.trie_walk(host.numpy(), co.numpy(), ct.numpy(),
                                                       cn.numpy()))
        return to_output(out.to(t.device), was_numpy)

    def _node_of(self, prefix) -> int:
        p, _ = as_tensor(np.asarray(prefix, dtype=np.int64) if isinstance(prefix, (list, tuple))
                         else prefix, "prefix")
        check_dtype(p, "prefix", (torch.int32, torch.int64))
        check_rank(p, "prefix", 1, "[l]")
        return int(self.walk(p.detach().cpu().reshape(1, -1))[0])

    def items_under(self, prefix) -> torch.Tensor:
        """Item ids (int64, on the trie's device, in sorted-code order) of the items whose code
        starts with ``prefix`` (a sequence of l <= L tokens); empty if no item does."""
        node = self._node_of(prefix)
        if node < 0:
            return torch.empty((0,), dtype=torch.int64, device=self.device)
        b, e = int(self._cpu("item_begin")[node]), int(self._cpu("item_end")[node])
        return self.item_perm[b:e].clone()

    def node_prefixes(self, nodes) -> torch.Tensor:
        """Token prefix of each node: int64 [M, d] for nodes [M] that all lie at depth d."""
        v, _ = as_tensor(nodes, "nodes")
        check_dtype(v, "nodes", (torch.int64, torch.int32))
        check_rank(v, "nodes", 1, "[M]")
        v = v.detach().cpu().to(torch.int64)
        check_index_range(v, "nodes", self.num_nodes)
        lo = self._cpu("level_offsets")
        depth = torch.bucketize(v, lo[1:], right=True)
        if v.numel() and not bool((depth == depth[0]).all()):
            raise ValueError("nodes must all lie at the same depth; got depths "
                             f"{sorted(set(depth.tolist()))}")
        d = int(depth[0]) if v.numel() else 0
        out = torch.empty((v.shape[0], d), dtype=torch.int64)
        tokens, parent = self._cpu("child_tokens"), self._cpu("node_parent")
        for col in range(d - 1, -1, -1):
            out[:, col] = tokens[v - 1]
            v = parent[v]
        return out.to(self.device)

    def prefix_buckets(self, length: int):
        """Items grouped by their code prefix of ``length`` tokens (three-step generation).

        Returns ``(bucket_codes int64 [nb, length], offsets int64 [nb + 1], item_ids int64
        [N])`` on the trie's device: bucket j holds ``item_ids[offsets[j]:offsets[j + 1]]``,
        buckets in sorted prefix order (bucket j is node ``level_range(length)[0] + j``).
        """
        length = check_int(length, "length", 0)
        if length > self._num_levels:
            raise ValueError(f"length must be <= {self._num_levels} (num_levels); got {length}")
        lo, hi = self.level_range(length)
        offsets = torch.cat([self._cpu("item_begin")[lo:hi],
                             torch.tensor([self._num_items], dtype=torch.int64)])
        codes = self.node_prefixes(torch.arange(lo, hi))
        return codes, offsets.to(self.device), self.item_perm.clone()

    def allowed_nodes(self, item_mask):
        """Node validity of item subsets: a node is valid iff at least one allowed item lies
        below it (no rebuild; O(N + N/64 + nodes) per mask).

        Args:
            item_mask: bool [item_id_bound] or [M, item_id_bound], indexed by item id; on the
                CPU or on the trie's device.
        Returns: bool [num_nodes] or [M, num_nodes] on the trie's device (NumPy if the mask
            was NumPy), ready for ``constrained_beam_step(allowed=...)``.
        """
        m, was_numpy = check_mask(item_mask, "item_mask", self._item_id_bound, "item_id_bound")
        if m.device.type != "cpu" and m.device != self.device:
            raise ValueError(f"item_mask must be on the CPU or on the trie's device "
                             f"({self.device}); got {m.device}")
        rows = m.reshape(-1, m.shape[-1])
        core = load_core()
        if m.device.type == "cpu" and core is not None:
            rows = rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()
            out = torch.empty((rows.shape[0], self.num_nodes), dtype=torch.bool)
            core.trie_allowed_nodes(rows.numpy(), self._cpu("item_perm").numpy(),
                                    self._cpu("item_begin").numpy(),
                                    self._cpu("item_end").numpy(), out.numpy())
            out = out.to(self.device)
        else:
            # Vectorized on the mask's device: prefix counts of the mask in sorted order.
            dev = self if m.device == self.device else (self._host or self)
            in_order = rows[:, dev.item_perm].to(torch.int32)
            counts = torch.nn.functional.pad(torch.cumsum(in_order, dim=1), (1, 0))
            out = (counts[:, dev.item_end] > counts[:, dev.item_begin]).to(self.device)
        out = out.reshape(*m.shape[:-1], self.num_nodes)
        return to_output(out, was_numpy)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``trie.safetensors`` and ``trie_config.json`` (with the tensors' SHA-256) into
        ``directory``, each file replaced atomically."""
        directory = Path(directory)
        atomic_save_tensors(directory / TENSORS_FILE,
                            {name: self._cpu(name) for name in _SAVED},
                            metadata={"format": FORMAT})
        digest = hashlib.sha256((directory / TENSORS_FILE).read_bytes()).hexdigest()
        atomic_write_json(directory / CONFIG_FILE, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_items": self._num_items,
            "num_levels": self._num_levels,
            "num_nodes": self.num_nodes,
            "codebook_size": self._codebook_size,
            "item_id_bound": self._item_id_bound,
            "nodes_per_level": self.nodes_per_level,
            "tensors_sha256": digest,
        })
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PrefixTrie":
        """Load a trie written by ``save`` (on the CPU, no rebuild). The tensors file must match
        the checksum in the config, and the arrays must form a consistent trie; anything else
        raises ValueError naming the file and the problem."""
        from safetensors.torch import load as load_bytes

        directory, cfg_path, config = read_artifact_config(
            directory, CONFIG_FILE, FORMAT, FORMAT_VERSION, "a trie", _FIELDS)
        ten_path = directory / TENSORS_FILE
        meta = {k: config[k] for k in ("num_items", "num_levels", "num_nodes", "codebook_size",
                                       "item_id_bound")}
        data = check_sha256(ten_path, None, config["tensors_sha256"], cfg_path)
        try:
            tensors = load_bytes(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{ten_path} is not a valid safetensors file: {exc}") from exc
        num_nodes = meta.pop("num_nodes")
        co = tensors.get("child_offsets")
        if co is None or list(co.shape) != [num_nodes + 1]:
            raise ValueError(f"{cfg_path}: field 'num_nodes' ({num_nodes}) must match "
                             f"{TENSORS_FILE}'s child_offsets [num_nodes + 1]; got "
                             f"{None if co is None else list(co.shape)}")
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        tensors["child_nodes"] = torch.arange(1, num_nodes, dtype=torch.int64)
        _check_structure(tensors, num_nodes=num_nodes, where=str(ten_path), **meta)
        return cls._from_arrays(tensors, **meta)


def _check_structure(t: dict, *, num_items: int, num_levels: int, num_nodes: int,
                     codebook_size: int, item_id_bound: int, where: str) -> None:
    """Every invariant the queries and kernels rely on (memory safety included), vectorized."""

    def fail(what: str):
        raise ValueError(f"{where}: not a consistent trie: {what}")

    n, L, V, K = num_items, num_levels, num_nodes, codebook_size
    shapes = {"level_offsets": L + 2, "child_offsets": V + 1, "child_tokens": V - 1,
              "node_parent": V, "item_begin": V, "item_end": V, "item_perm": n,
              "root_children": K, "child_nodes": V - 1}
    for name, length in shapes.items():
        a = t.get(name)
        if a is None:
            fail(f"missing tensor {name!r}")
        if a.dtype != torch.int64 or list(a.shape) != [length]:
            fail(f"{name} must be int64 [{length}]; got {dtype_name(a.dtype)} {list(a.shape)}")
    lo = t["level_offsets"]
    if lo[0] != 0 or lo[1] != 1 or lo[-1] != V or not bool((torch.diff(lo) > 0).all()):
        fail("level_offsets must start 0, 1, increase strictly and end at num_nodes")
    co = t["child_offsets"]
    fanout = torch.diff(co)
    if co[0] != 0 or co[-1] != V - 1 or not bool((fanout >= 0).all()):
        fail("child_offsets must start at 0, not decrease and end at num_nodes - 1")
    tok, parent = t["child_tokens"], t["node_parent"]
    if V > 1 and (int(tok.min()) < 0 or int(tok.max()) >= K):
        fail(f"child_tokens must lie in [0, {K})")
    expected_parent = torch.repeat_interleave(torch.arange(V), fanout)
    if parent[0] != -1 or not torch.equal(parent[1:], expected_parent):
        fail("node_parent must match child_offsets")
    depth = torch.bucketize(torch.arange(V), lo[1:], right=True)
    if V > 1 and not torch.equal(depth[parent[1:]] + 1, depth[1:]):
        fail("every child must lie one level below its parent")
    keys = parent[1:] * K + tok
    if V > 2 and not bool((torch.diff(keys) > 0).all()):
        fail("child tokens must be unique and ascending within each node")
    b, e = t["item_begin"], t["item_end"]
    if not bool(((b >= 0) & (b < e) & (e <= n)).all()):
        fail(f"item ranges must satisfy 0 <= begin < end <= {n}")
    for d in range(L + 1):
        bd, ed = b[lo[d]:lo[d + 1]], e[lo[d]:lo[d + 1]]
        if bd[0] != 0 or ed[-1] != n or not torch.equal(bd[1:], ed[:-1]):
            fail(f"the item ranges of depth {d} must partition [0, {n})")
    if V > 1 and not bool(((b[1:] >= b[parent[1:]]) & (e[1:] <= e[parent[1:]])).all()):
        fail("a child's item range must lie inside its parent's")
    perm = t["item_perm"]
    if int(perm.min()) < 0 or int(perm.max()) + 1 != item_id_bound:
        fail(f"item_perm must lie in [0, item_id_bound) and reach item_id_bound - 1 = "
             f"{item_id_bound - 1} (item_id_bound is the largest item id + 1); got ids in "
             f"[{int(perm.min())}, {int(perm.max())}]")
    if torch.unique(perm).numel() != n:
        fail("item_perm must hold each item id once")
    rc = torch.full((K,), -1, dtype=torch.int64)
    rc[tok[: int(co[1])]] = torch.arange(1, int(co[1]) + 1)
    if not torch.equal(rc, t["root_children"]):
        fail("root_children must match the root's children")

"""Hybrid item tokenization (DESIGN.md §1.2): SID prefix tokens + one unique item embedding.

An item's hybrid token is the first ``prefix_len`` levels of its residual-quantization semantic
ID, as new vocabulary tokens, followed by an item placeholder token whose input embedding is
replaced at run time by ``ṽ_i = ProjFuse(frozen ID, grounded text, ...)``.

>>> tok = HybridItemTokenizer(prefix_len=1).fit(grounded, id_embeddings=id_emb, seed=0)
>>> tok.report()                                 # bucket sizes, collision rate
>>> tok.prefix_codes()                           # int64 [N, 1]   (SID1ID)
>>> tok.full_codes()                             # int64 [N, L+1] (GR(SID) baseline)
>>> vocab = tok.extend_tokenizer(hf_tokenizer)  # adds <a_0>.., <q>, <item>; -> SIDVocab
>>> tok.build_proj_fuse(hidden_size=model.config.hidden_size)
>>> v = tok.item_embeddings(torch.tensor([3, 7]))   # [2, hidden]
>>> tok.save("tok_dir"); tok2 = HybridItemTokenizer.load("tok_dir")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import (Field, atomic_save_tensors, atomic_write_json, check_fields, load_tensors,
                   read_artifact_config, recorded_digests, sha256_file)
from ..quantizer import ResidualQuantizer
from ..rq import dedup_codes
from ..sid_vocab import SIDVocab, sid_token

__all__ = ["HybridItemTokenizer", "ProjFuse", "default_codebook_size"]

FORMAT = "sigma_fast.HybridItemTokenizer"
FORMAT_VERSION = 2  # 2: the config records the SHA-256 of the tensor files
CONFIG_FILE = "hybrid_tokenizer.json"
RQ_DIR = "rq"
TABLES_FILE = "item_tables.safetensors"
PROJ_FUSE_FILE = "proj_fuse.safetensors"
QUERY_TOKEN = "<q>"
ITEM_TOKEN = "<item>"
_FIELDS = {
    "num_levels": Field("int", lo=1), "codebook_size": Field("int", lo=1),
    "prefix_len": Field("int", lo=1), "beam_width": Field("int", lo=1, optional=True),
    "iters": Field("int", lo=0, optional=True), "num_items": Field("int", lo=1),
    "tables": Field("list", items="str", lo=1), "proj_fuse": Field("dict", nullable=True),
    "token_ids": Field("dict", nullable=True, optional=True),
    "query_token": Field("str", choices=(QUERY_TOKEN,), optional=True),
    "item_token": Field("str", choices=(ITEM_TOKEN,), optional=True),
}
_PROJ_FUSE_FIELDS = {"input_dims": Field("list", items="int", lo=1),
                     "hidden_size": Field("int", lo=1), "mlp_hidden": Field("int", lo=1)}
_TOKEN_ID_FIELDS = {"sid": Field("list", lo=1), "query": Field("int", lo=0),
                    "item": Field("int", lo=0)}


def default_codebook_size(num_items: int, *, target_bucket: int = 64, lo: int = 8,
                          hi: int = 256) -> int:
    """``K = clamp(round(N / target_bucket), lo, hi)``, further capped at N.

    With K first-level codewords a first-level bucket holds N / K items on average, so the
    default aims at buckets of about 64 items (tens to hundreds): small enough that step 2 of
    generation searches few items, large enough that prefix beams stay few and well separated.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1; got {num_items}")
    return int(min(max(round(num_items / target_bucket), lo), hi, num_items))


class ProjFuse(nn.Module):
    """Proj&Fuse: frozen item embeddings (ID, grounded text, any extra) -> ``ṽ_i`` [.., hidden].

    Each input is L2-normalised (the tables live on unrelated scales), the results are
    concatenated and mapped by ``Linear -> GELU -> Linear`` (``mlp_hidden`` wide, default
    ``hidden_size``) to the LM's hidden size. Only this module is trainable; the tables it
    reads stay frozen.
    """

    def __init__(self, input_dims: list[int], hidden_size: int, mlp_hidden: int | None = None):
        super().__init__()
        if not input_dims or any(int(d) < 1 for d in input_dims):
            raise ValueError(f"input_dims must be a non-empty list of positive sizes; got "
                             f"{input_dims}")
        self.input_dims = [int(d) for d in input_dims]
        self.hidden_size = int(hidden_size)
        self.mlp_hidden = int(mlp_hidden or hidden_size)
        self.net = nn.Sequential(nn.Linear(sum(self.input_dims), self.mlp_hidden), nn.GELU(),
                                 nn.Linear(self.mlp_hidden, self.hidden_size))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_dims):
            raise ValueError(f"ProjFuse expects {len(self.input_dims)} inputs (dims "
                             f"{self.input_dims}); got {len(inputs)}")
        for k, (x, d) in enumerate(zip(inputs, self.input_dims)):
            if x.shape[-1] != d:
                raise ValueError(f"ProjFuse input {k} must have last dimension {d}; got shape "
                                 f"{list(x.shape)}")
        return self.net(torch.cat([F.normalize(x, dim=-1) for x in inputs], dim=-1))


class HybridItemTokenizer:
    """Semantic IDs of grounded item embeddings plus the Proj&Fuse unique item embedding.

    Args:
        num_levels: RQ levels of the full SID (4 in the paper).
        codebook_size: codewords per level; default :func:`default_codebook_size` of N.
        prefix_len: ℓ, how many SID levels become prefix tokens (1 = "SID1ID").
        beam_width, iters: passed to :meth:`ResidualQuantizer.fit`.
    """

    def __init__(self, num_levels: int = 4, codebook_size: int | None = None, prefix_len: int = 1,
                 *, beam_width: int = 1, iters: int = 20):
        if not 1 <= prefix_len <= num_levels:
            raise ValueError(f"prefix_len must be in [1, num_levels = {num_levels}]; got "
                             f"{prefix_len}")
        self.num_levels = int(num_levels)
        self.codebook_size = codebook_size
        self.prefix_len = int(prefix_len)
        self.beam_width = int(beam_width)
        self.iters = int(iters)
        self.rq: ResidualQuantizer | None = None
        self.codes: np.ndarray | None = None        # int64 [N, L]
        self.tables: dict[str, torch.Tensor] = {}   # frozen item tables, ProjFuse input order
        self.proj_fuse: ProjFuse | None = None
        self.token_ids: dict | None = None          # recorded by extend_tokenizer

    # --------------------------------------------------------------------------- fitting
    def fit(self, grounded, *, id_embeddings=None, extra: dict | None = None, seed: int = 0,
            progress: bool | None = None) -> "HybridItemTokenizer":
        """Quantize the grounded embeddings float32 [N, D] and keep the frozen item tables
        (grounded ``text``, ``id`` and any ``extra`` named [N, *] tables) for Proj&Fuse."""
        x = np.ascontiguousarray(np.asarray(grounded, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"grounded must be a non-empty 2-d [N, D] array; got shape "
                             f"{list(x.shape)}")
        n = x.shape[0]
        k = self.codebook_size or default_codebook_size(n)
        self.codebook_size = int(k)
        self.rq = ResidualQuantizer(beam_width=self.beam_width).fit(
            x, self.num_levels, self.codebook_size, iters=self.iters, seed=seed,
            progress=progress)
        self.codes = np.asarray(self.rq.encode(x), dtype=np.int64)
        tables = {"text": x}
        if id_embeddings is not None:
            tables["id"] = id_embeddings
        for name, t in (extra or {}).items():
            if name in tables:
                raise ValueError(f"extra table name {name!r} is reserved")
            tables[name] = t
        self.tables = {}
        for name, t in tables.items():
            arr = np.asarray(t, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"item table {name!r} must be [{n}, dim] (one row per item); "
                                 f"got shape {list(arr.shape)}")
            self.tables[name] = torch.from_numpy(np.ascontiguousarray(arr))
        self.proj_fuse = None
        return self

    def variant(self, prefix_len: int | None = None) -> "HybridItemTokenizer":
        """A tokenizer sharing this one's fitted codes and item tables (no refit), with its own
        prefix length, vocabulary ids and (unbuilt) Proj&Fuse: for a second model over the same
        semantic IDs (e.g. GR(SID) next to SIGMA)."""
        codes = self._require_fitted()
        tok = HybridItemTokenizer(self.num_levels, self.codebook_size,
                                  self.prefix_len if prefix_len is None else prefix_len,
                                  beam_width=self.beam_width, iters=self.iters)
        tok.rq, tok.codes, tok.tables = self.rq, codes, dict(self.tables)
        return tok

    def _require_fitted(self) -> np.ndarray:
        if self.codes is None or self.rq is None:
            raise RuntimeError("HybridItemTokenizer is not fitted: call fit() or load()")
        return self.codes

    @property
    def num_items(self) -> int:
        return int(self._require_fitted().shape[0])

    # ----------------------------------------------------------------------------- codes
    def prefix_codes(self) -> np.ndarray:
        """int64 [N, prefix_len]: each item's SID prefix (its bucket)."""
        return self._require_fitted()[:, : self.prefix_len].copy()

    def full_codes(self) -> np.ndarray:
        """int64 [N, L + 1]: the full SID made unique by ``dedup_codes`` (GR(SID) baseline)."""
        codes, _ = dedup_codes(self._require_fitted())
        return codes

    def report(self) -> dict:
        """Bucket size distribution of the prefix and collision statistics of the full SID."""
        codes = self._require_fitted()
        _, bucket_sizes = np.unique(codes[:, : self.prefix_len], axis=0, return_counts=True)
        _, full_counts = np.unique(codes, axis=0, return_counts=True)
        n = codes.shape[0]
        q = np.percentile(bucket_sizes, [0, 10, 50, 90, 100])
        return {
            "num_items": n,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "prefix_len": self.prefix_len,
            "num_buckets": int(len(bucket_sizes)),
            "bucket_size": {"min": int(q[0]), "p10": float(q[1]), "median": float(q[2]),
                            "p90": float(q[3]), "max": int(q[4]),
                            "mean": float(bucket_sizes.mean())},
            "unused_first_level_codes": int(self.codebook_size
                                            - len(np.unique(codes[:, 0]))),
            "collision_rate": 1.0 - len(full_counts) / n,
            "max_items_per_full_code": int(full_counts.max()),
        }

    # ---------------------------------------------------------------------- vocabulary
    def level_sizes(self, levels: int | None = None) -> list[int]:
        """Vocabulary size of each of the first ``levels`` SID levels (default prefix_len).
        Every level has the same size S, so that code c of level l is token ``offset_l + c``
        with one code range (a :class:`~sigma_fast.SIDVocab`): S = K, or for
        ``num_levels + 1`` levels (the dedup level of :meth:`full_codes`) max(K, max suffix + 1)."""
        codes = self._require_fitted()
        levels = self.prefix_len if levels is None else int(levels)
        if not 1 <= levels <= self.num_levels + 1:
            raise ValueError(f"levels must be in [1, {self.num_levels + 1}]; got {levels}")
        size = self.codebook_size
        if levels == self.num_levels + 1:
            size = max(size, dedup_codes(codes)[1] + 1)
        return [size] * levels

    def sid_tokens(self, levels: int | None = None) -> list[list[str]]:
        """Token strings per level, e.g. ``[["<a_0>", ..., "<a_K-1>"]]`` for ℓ = 1."""
        return [[sid_token(l, c) for c in range(size)]
                for l, size in enumerate(self.level_sizes(levels))]

    def extend_tokenizer(self, hf_tokenizer, *, levels: int | None = None) -> SIDVocab:
        """Add the SID tokens of the first ``levels`` levels (default ``prefix_len``; pass
        ``num_levels + 1`` for full-SID GR(SID) generation) with :meth:`SIDVocab.add_tokens`,
        then the query token ``<q>`` and the item placeholder ``<item>``, to a Hugging Face
        tokenizer (idempotent; special, unnormalised tokens).

        Returns the :class:`~sigma_fast.SIDVocab` the search uses, and records every id in
        ``token_ids`` (``{"sid": [[id per code] per level], "query": id, "item": id}``); resize
        the model's embeddings to ``len(hf_tokenizer)`` afterwards.
        """
        from transformers import AddedToken

        sizes = self.level_sizes(levels)
        vocab = SIDVocab.add_tokens(hf_tokenizer, len(sizes), sizes[0])
        hf_tokenizer.add_tokens([AddedToken(t, normalized=False, special=True)
                                 for t in (QUERY_TOKEN, ITEM_TOKEN)], special_tokens=True)
        self.token_ids = self.lookup_token_ids(hf_tokenizer, levels=len(sizes))
        return vocab

    @property
    def vocab(self) -> SIDVocab:
        """The :class:`~sigma_fast.SIDVocab` of the recorded SID token ids (after
        :meth:`extend_tokenizer`, or as loaded)."""
        if self.token_ids is None:
            raise RuntimeError("no SID tokens recorded: call extend_tokenizer() first")
        ids = self.token_ids["sid"]
        for level, t in enumerate(ids):
            if len(t) != len(ids[0]) or t != list(range(t[0], t[0] + len(t))):
                raise ValueError(f"the SID tokens of level {level} are not {len(ids[0])} "
                                 f"consecutive vocabulary ids; rebuild the tokenizer with "
                                 f"extend_tokenizer")
        return SIDVocab([t[0] for t in ids], len(ids[0]))

    def lookup_token_ids(self, hf_tokenizer, *, levels: int | None = None) -> dict:
        """The ids of this tokenizer's tokens in ``hf_tokenizer`` (which must already hold them,
        e.g. a tokenizer saved after :meth:`extend_tokenizer`)."""
        per_level = self.sid_tokens(levels)
        unk = hf_tokenizer.unk_token_id
        vocab = hf_tokenizer.get_vocab()

        def tid(t):
            i = vocab.get(t)
            if i is None or (unk is not None and i == unk):
                raise ValueError(f"token {t!r} is not in the Hugging Face tokenizer; call "
                                 f"extend_tokenizer first")
            return int(i)

        return {"sid": [[tid(t) for t in level] for level in per_level],
                "query": tid(QUERY_TOKEN), "item": tid(ITEM_TOKEN)}

    def item_prompt(self, item: int) -> str:
        """The hybrid token text of an item: its SID prefix tokens then ``<item>``."""
        codes = self._require_fitted()
        return "".join(sid_token(l, c) for l, c in enumerate(codes[item, : self.prefix_len])) \
            + ITEM_TOKEN

    # ------------------------------------------------------------------------ Proj&Fuse
    def build_proj_fuse(self, hidden_size: int, *, mlp_hidden: int | None = None,
                        seed: int = 0) -> ProjFuse:
        """Create the (untrained) Proj&Fuse over this tokenizer's item tables."""
        self._require_fitted()
        torch.manual_seed(seed)
        self.proj_fuse = ProjFuse([t.shape[1] for t in self.tables.values()], hidden_size,
                                  mlp_hidden)
        return self.proj_fuse

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """``ṽ_i`` [..., hidden] for item indices (differentiable w.r.t. Proj&Fuse only)."""
        if self.proj_fuse is None:
            raise RuntimeError("no Proj&Fuse module: call build_proj_fuse() or load()")
        item_ids = torch.as_tensor(item_ids)
        if item_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"item_ids must be int32 or int64; got {item_ids.dtype}")
        if item_ids.numel() and (item_ids.min() < 0 or item_ids.max() >= self.num_items):
            raise IndexError(f"item_ids must be in [0, {self.num_items}); got values in "
                             f"[{int(item_ids.min())}, {int(item_ids.max())}]")
        device = next(self.proj_fuse.parameters()).device
        ids = item_ids.to(device)
        return self.proj_fuse(*(t.to(device)[ids] for t in self.tables.values()))

    # ---------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the quantizer (``rq/``), the item codes and frozen tables, the Proj&Fuse weights
        (when built) and ``hybrid_tokenizer.json`` (with the SHA-256 of each tensor file); each
        file is replaced atomically and the config, which names the rest, is written last."""
        codes = self._require_fitted()
        directory = Path(directory)
        self.rq.save(directory / RQ_DIR)
        atomic_save_tensors(directory / TABLES_FILE,
                            {"codes": torch.from_numpy(codes),
                             **{f"table.{k}": v for k, v in self.tables.items()}},
                            metadata={"format": FORMAT})
        files = [TABLES_FILE]
        if self.proj_fuse is not None:
            atomic_save_tensors(directory / PROJ_FUSE_FILE, self.proj_fuse.state_dict(),
                                metadata={"format": "sigma_fast.ProjFuse"})
            files.append(PROJ_FUSE_FILE)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "prefix_len": self.prefix_len,
            "beam_width": self.beam_width,
            "iters": self.iters,
            "num_items": int(codes.shape[0]),
            "tables": list(self.tables),
            "proj_fuse": None if self.proj_fuse is None else {
                "input_dims": self.proj_fuse.input_dims,
                "hidden_size": self.proj_fuse.hidden_size,
                "mlp_hidden": self.proj_fuse.mlp_hidden},
            "token_ids": self.token_ids,
            "query_token": QUERY_TOKEN,
            "item_token": ITEM_TOKEN,
            "files_sha256": {f: sha256_file(directory / f) for f in files},
        }
        atomic_write_json(directory / CONFIG_FILE, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HybridItemTokenizer":
        """Read a tokenizer written by ``save``: every field of ``hybrid_tokenizer.json`` is
        checked (types, ranges), each tensor file must match its recorded SHA-256, and codes,
        tables and Proj&Fuse weights must have the shapes and ranges the config states;
        anything else raises ValueError naming the file and the field."""
        directory, path, config = read_artifact_config(
            directory, CONFIG_FILE, FORMAT, FORMAT_VERSION, "a hybrid item tokenizer", _FIELDS)
        pf = config["proj_fuse"]
        if pf is not None:
            check_fields(pf, _PROJ_FUSE_FIELDS, f"{path} (field 'proj_fuse')")
        if config.get("token_ids") is not None:
            _check_token_ids(config["token_ids"], path)
        try:
            tok = cls(config["num_levels"], config["codebook_size"], config["prefix_len"],
                      beam_width=config.get("beam_width", 1), iters=config.get("iters", 20))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        names, n = list(config["tables"]), config["num_items"]
        files = [TABLES_FILE] + ([PROJ_FUSE_FILE] if pf is not None else [])
        digests = recorded_digests(config, path, files, since=2)
        tok.rq = ResidualQuantizer.load(directory / RQ_DIR)
        tensors = load_tensors(directory / TABLES_FILE, sha256=digests[TABLES_FILE],
                               config_path=path)
        want = ["codes", *(f"table.{t}" for t in names)]
        if sorted(tensors) != sorted(want):
            raise ValueError(f"{directory / TABLES_FILE}: expected tensors {sorted(want)} (from "
                             f"{CONFIG_FILE}); got {sorted(tensors)}")
        codes = tensors["codes"]
        if (codes.dtype != torch.int64 or list(codes.shape) != [n, tok.num_levels]
                or tok.rq.num_levels != tok.num_levels
                or tok.rq.codebook_size != tok.codebook_size):
            raise ValueError(f"{directory}: codes {str(codes.dtype)} {list(codes.shape)} and "
                             f"quantizer {tok.rq} do not match the config ({n} items, "
                             f"{tok.num_levels} levels of {tok.codebook_size})")
        if int(codes.min()) < 0 or int(codes.max()) >= tok.codebook_size:
            raise ValueError(f"{directory / TABLES_FILE}: codes must lie in [0, "
                             f"{tok.codebook_size}) (codebook_size in {CONFIG_FILE}); got "
                             f"values in [{int(codes.min())}, {int(codes.max())}]")
        tok.codes = codes.numpy()
        tok.tables = {t: tensors[f"table.{t}"] for t in names}
        for t, v in tok.tables.items():
            if v.dtype != torch.float32 or v.dim() != 2 or v.shape[0] != n or v.shape[1] < 1:
                raise ValueError(f"{directory / TABLES_FILE}: table {t!r} must be float32 "
                                 f"[{n}, dim]; got {str(v.dtype)} {list(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{directory / TABLES_FILE}: table {t!r} must be finite")
        if pf is not None:
            if len(pf["input_dims"]) != len(names) or pf["input_dims"] != \
                    [int(v.shape[1]) for v in tok.tables.values()]:
                raise ValueError(f"{path}: field 'proj_fuse' input_dims {pf['input_dims']} must "
                                 f"be the widths of the tables {names}: "
                                 f"{[int(v.shape[1]) for v in tok.tables.values()]}")
            tok.proj_fuse = ProjFuse(pf["input_dims"], pf["hidden_size"], pf["mlp_hidden"])
            state = load_tensors(directory / PROJ_FUSE_FILE, sha256=digests[PROJ_FUSE_FILE],
                                 config_path=path)
            try:
                tok.proj_fuse.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"{directory / PROJ_FUSE_FILE} does not match the Proj&Fuse "
                                 f"config in {path}: {exc}") from exc
        tok.token_ids = config.get("token_ids")
        return tok


def _check_token_ids(token_ids: dict, path: Path) -> None:
    where = f"{path} (field 'token_ids')"
    check_fields(token_ids, _TOKEN_ID_FIELDS, where)
    for level, ids in enumerate(token_ids["sid"]):
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{where}: sid[{level}] must be a list of token ids (ints >= 0)")

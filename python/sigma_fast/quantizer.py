"""ResidualQuantizer: residual k-means training, encoding, statistics and persistence."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._checks import as_tensor, check_dtype, check_finite, check_int, check_rank
from ._io import (Field, atomic_save_tensors, atomic_write_json, load_tensors,
                  read_artifact_config, sha256_file)
from .rq import rq_decode, rq_encode

FORMAT = "sigma_fast.ResidualQuantizer"
FORMAT_VERSION = 2  # 2: rq_config.json records the SHA-256 of codebooks.safetensors
CODEBOOKS_FILE = "codebooks.safetensors"
CONFIG_FILE = "rq_config.json"
_FIELDS = {
    "num_levels": Field("int", lo=1), "codebook_size": Field("int", lo=1),
    "dim": Field("int", lo=1), "beam_width": Field("int", lo=1),
    "fit_stats": Field("dict", optional=True),
    "tensors_sha256": Field("sha256", optional=True),  # required from format_version 2
}


@dataclass
class RQStats:
    """Quality statistics of a quantizer on a set of vectors.

    usage: int64 [L, K], how many rows chose each codeword at each level.
    used_fraction: per level, the fraction of codewords used at least once.
    mean_sq_error: mean over rows of ||x - decode(encode(x))||^2 (final residual norm).
    relative_error: sum of squared errors / sum of ||x||^2.
    collision_rate: 1 - (number of distinct full codes) / N, the share of rows whose full
        code repeats an earlier row's (0 when every code is unique).
    max_items_per_code: the most rows sharing one full code.
    """

    usage: np.ndarray
    used_fraction: list
    mean_sq_error: float
    relative_error: float
    collision_rate: float
    max_items_per_code: int

    def as_dict(self) -> dict:
        return {
            "used_fraction": [float(f) for f in self.used_fraction],
            "mean_sq_error": self.mean_sq_error,
            "relative_error": self.relative_error,
            "collision_rate": self.collision_rate,
            "max_items_per_code": self.max_items_per_code,
        }


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling), deterministic for a generator state."""
    n = points.shape[0]
    p64 = points.astype(np.float64)
    norms = (p64 * p64).sum(axis=1)
    centers = np.empty((k, points.shape[1]), dtype=np.float32)

    def dist_to(idx):
        return np.maximum(norms - 2.0 * (p64 @ p64[idx]) + norms[idx], 0.0)

    first = int(rng.integers(n))
    centers[0] = points[first]
    closest = dist_to(first)
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: repeat points, reseeding fixes it later
            idx = int(rng.integers(n))
        else:
            idx = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
            idx = min(idx, n - 1)
        centers[c] = points[idx]
        np.minimum(closest, dist_to(idx), out=closest)
    return centers


def _assign(points: np.ndarray, centers: np.ndarray, backend) -> tuple[np.ndarray, np.ndarray]:
    codes, err = rq_encode(points, centers[None], return_error=True, backend=backend)
    return codes[:, 0], err


def _update(points: np.ndarray, assign: np.ndarray, err: np.ndarray, centers: np.ndarray) -> int:
    """Move centres to their cluster means; reseed empty ones on the worst-quantized points.
    Returns how many were reseeded."""
    k = centers.shape[0]
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=k)
    nonempty = np.nonzero(counts)[0]
    starts = np.concatenate(([0], np.cumsum(counts)))[nonempty]
    sums = np.add.reduceat(points[order].astype(np.float64), starts, axis=0)
    centers[nonempty] = (sums / counts[nonempty, None]).astype(np.float32)
    empty = np.nonzero(counts == 0)[0]
    if len(empty):
        # The points quantized worst become new centres (stable order for determinism).
        worst = np.argsort(-err.astype(np.float64), kind="stable")[: len(empty)]
        centers[empty[: len(worst)]] = points[worst]
    return len(empty)


class ResidualQuantizer:
    """L levels of K codewords each, trained by residual k-means.

    >>> rq = ResidualQuantizer().fit(x, num_levels=4, codebook_size=256, seed=0)
    >>> codes = rq.encode(x)                    # int64 [N, 4]
    >>> x_hat = rq.decode(codes)                 # float32 [N, D]
    >>> rq.stats(x).collision_rate
    >>> rq.save("rq_dir"); rq2 = ResidualQuantizer.load("rq_dir")
    """

    def __init__(self, codebooks=None, *, beam_width: int = 1):
        self.beam_width = check_int(beam_width, "beam_width", 1)
        self.codebooks: torch.Tensor | None = None
        self.fit_stats: dict = {}
        if codebooks is not None:
            cb, _ = as_tensor(codebooks, "codebooks")
            check_dtype(cb, "codebooks", (torch.float32,))
            check_rank(cb, "codebooks", 3, "[L, K, D]")
            check_finite(cb, "codebooks")
            self.codebooks = cb.detach().cpu().contiguous()

    # ------------------------------------------------------------------ shape facts
    def _require_fitted(self) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("ResidualQuantizer has no codebooks yet: call fit() or load()")
        return self.codebooks

    @property
    def num_levels(self) -> int:
        return int(self._require_fitted().shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self._require_fitted().shape[1])

    @property
    def dim(self) -> int:
        return int(self._require_fitted().shape[2])

    def __repr__(self) -> str:
        if self.codebooks is None:
            return "ResidualQuantizer(unfitted)"
        return (f"ResidualQuantizer(num_levels={self.num_levels}, codebook_size="
                f"{self.codebook_size}, dim={self.dim}, beam_width={self.beam_width})")

    # ---------------------------------------------------------------------- training
    def fit(self, x, num_levels: int, codebook_size: int, *, iters: int = 20, seed: int = 0,
            beam_width: int | None = None, init_sample: int | None = None,
            progress: bool | None = None, backend: str | None = None) -> "ResidualQuantizer":
        """Train the codebooks by residual k-means.

        Level l runs k-means++ seeding (on up to ``init_sample`` rows, default 64·K) then
        ``iters`` Lloyd iterations on the residuals left by levels 0..l-1; empty codewords are
        reseeded on the worst-quantized rows. With ``beam_width`` B > 1 the residuals passed
        to the next level come from beam-B encoding with the levels trained so far. The
        result depends only on the data, the arguments and ``seed``.
        """
        from tqdm.auto import tqdm

        x_t, _ = as_tensor(x, "x")
        check_dtype(x_t, "x", (torch.float32,))
        check_rank(x_t, "x", 2, "[N, D]")
        num_levels = check_int(num_levels, "num_levels", 1)
        codebook_size = check_int(codebook_size, "codebook_size", 1)
        iters = check_int(iters, "iters", 0)
        seed = check_int(seed, "seed", 0)
        if beam_width is not None:
            self.beam_width = check_int(beam_width, "beam_width", 1)
        n, d = x_t.shape
        if n < codebook_size:
            raise ValueError(f"fit needs at least codebook_size = {codebook_size} rows; got {n}")
        check_finite(x_t, "x")
        data = np.ascontiguousarray(x_t.detach().cpu().numpy(), dtype=np.float32)
        sample = init_sample if init_sample is not None else 64 * codebook_size
        sample = min(n, check_int(sample, "init_sample", 1))

        codebooks = np.zeros((num_levels, codebook_size, d), dtype=np.float32)
        residual = data.copy()
        reseeded = []
        bar = tqdm(total=num_levels * max(iters, 1), desc="residual k-means", unit="iter",
                   disable=(not progress) if progress is not None else None, leave=False)
        for level in range(num_levels):
            rng = np.random.default_rng([seed, level])
            pick = np.sort(rng.choice(n, size=sample, replace=False)) if sample < n else np.arange(n)
            centers = _kmeans_pp(residual[pick], codebook_size, rng)
            n_reseeded = 0
            for _ in range(iters):
                assign, err = _assign(residual, centers, backend)
                n_reseeded += _update(residual, assign, err, centers)
                bar.update(1)
            if iters == 0:
                bar.update(1)
            codebooks[level] = centers
            if self.beam_width > 1:
                codes = rq_encode(data, codebooks[: level + 1], beam_width=self.beam_width,
                                  backend=backend)
                residual = data - rq_decode(codes, codebooks[: level + 1], backend=backend)
            else:
                assign, _ = _assign(residual, centers, backend)
                residual = residual - centers[assign]
            reseeded.append(n_reseeded)
        bar.close()
        self.codebooks = torch.from_numpy(codebooks)
        self.fit_stats = {"reseeded_per_level": reseeded, "seed": seed, "iters": iters,
                          "num_rows": int(n)}
        return self

    # ------------------------------------------------------------------------ coding
    def _codebooks_for(self, like: torch.Tensor | np.ndarray):
        cb = self._require_fitted()
        if isinstance(like, torch.Tensor):
            return cb.to(like.device)
        return cb.numpy()

    def encode(self, x, *, beam_width: int | None = None, return_error: bool = False,
               backend: str | None = None):
        """``rq_encode`` with this quantizer's codebooks (beam width defaults to the one it was
        trained with)."""
        return rq_encode(x, self._codebooks_for(x), beam_width=beam_width or self.beam_width,
                         return_error=return_error, backend=backend)

    def decode(self, codes, *, levels: int | None = None, backend: str | None = None):
        """``rq_decode`` with this quantizer's codebooks."""
        return rq_decode(codes, self._codebooks_for(codes), levels=levels, backend=backend)

    def stats(self, x, *, beam_width: int | None = None, backend: str | None = None) -> RQStats:
        """Codeword usage, reconstruction error and code collisions on ``x``."""
        codes, err = self.encode(x, beam_width=beam_width, return_error=True, backend=backend)
        codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else codes
        err = err.cpu().numpy() if isinstance(err, torch.Tensor) else err
        x_np = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        n = codes.shape[0]
        usage = np.stack([np.bincount(codes[:, l], minlength=self.codebook_size)
                          for l in range(self.num_levels)]) if n else np.zeros(
            (self.num_levels, self.codebook_size), dtype=np.int64)
        if n:
            _, counts = np.unique(codes, axis=0, return_counts=True)
            distinct, max_per = len(counts), int(counts.max())
        else:
            distinct, max_per = 0, 0
        total = float((x_np.astype(np.float64) ** 2).sum())
        return RQStats(
            usage=usage,
            used_fraction=list((usage > 0).mean(axis=1)),
            mean_sq_error=float(err.astype(np.float64).mean()) if n else 0.0,
            relative_error=float(err.astype(np.float64).sum() / total) if total > 0 else 0.0,
            collision_rate=1.0 - distinct / n if n else 0.0,
            max_items_per_code=max_per,
        )

    # ------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``codebooks.safetensors`` and ``rq_config.json`` (with the codebooks file's
        SHA-256) into ``directory``, each file replaced atomically, the config last."""
        cb = self._require_fitted()
        directory = Path(directory)
        atomic_save_tensors(directory / CODEBOOKS_FILE, {"codebooks": cb},
                            metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "dim": self.dim,
            "beam_width": self.beam_width,
            "fit_stats": self.fit_stats,
            "tensors_sha256": sha256_file(directory / CODEBOOKS_FILE),
        }
        atomic_write_json(directory / CONFIG_FILE, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ResidualQuantizer":
        """Read a quantizer written by ``save``. Every field of ``rq_config.json`` is checked
        (types and ranges), the codebooks file must match the SHA-256 the config records and
        the shape it states, and the codebooks must be finite; anything else raises ValueError
        naming the file and the field. A save of format version 1 (no checksum) still loads,
        with a warning that its codebooks cannot be verified."""
        directory, path, config = read_artifact_config(
            directory, CONFIG_FILE, FORMAT, FORMAT_VERSION, "a quantizer", _FIELDS)
        digest = config.get("tensors_sha256")
        if digest is None:
            if config["format_version"] >= 2:
                raise ValueError(f"{path}: missing field 'tensors_sha256' (the SHA-256 of "
                                 f"{CODEBOOKS_FILE}, required from format_version 2)")
            warnings.warn(f"{path} has format_version 1, which records no checksum: "
                          f"{CODEBOOKS_FILE} cannot be verified; save the quantizer again to "
                          f"add one", UserWarning, stacklevel=2)
        tensors = load_tensors(directory / CODEBOOKS_FILE, sha256=digest, config_path=path)
        if sorted(tensors) != ["codebooks"]:
            raise ValueError(f"{directory / CODEBOOKS_FILE}: expected exactly one tensor named "
                             f"'codebooks'; got {sorted(tensors)}")
        cb = tensors["codebooks"]
        expected = [config["num_levels"], config["codebook_size"], config["dim"]]
        if cb.dtype != torch.float32 or list(cb.shape) != expected:
            raise ValueError(f"{directory / CODEBOOKS_FILE}: expected float32 codebooks of shape "
                             f"{expected} (from {CONFIG_FILE}); got {str(cb.dtype)} "
                             f"{list(cb.shape)}")
        try:
            check_finite(cb, "codebooks")
        except ValueError as exc:
            raise ValueError(f"{directory / CODEBOOKS_FILE}: {exc}") from None
        rq = cls(cb, beam_width=config["beam_width"])
        rq.fit_stats = config.get("fit_stats", {})
        return rq

"""The model object the front ends call, and the run it serves.

A *backend* is any object with ``__call__(samples: list[TaskSample], *, top_n: int) ->
Recommendations`` (item indices best first, padding -1): today the eager
:class:`sigma_fast.rec.generate.Recommender`. The HTTP server and the batch-offline job only use
that call, so a faster engine with the same signature drops in behind :func:`load_backend`
(``factory=``) or is handed to them directly.

>>> served = load_served("runs/demo", variant="sigma")      # run config, dataset, requests, backend
>>> out = served.backend([served.requests.build(user="100k_196")], top_n=10)
>>> served.items_of(out, 0)                                  # [{"id", "title", "score"}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

__all__ = ["Backend", "Served", "load_backend", "load_served", "run_settings"]


class Backend(Protocol):
    def __call__(self, samples: list, *, top_n: int): ...


def run_settings(run_dir) -> dict:
    """The run's configuration (its ``config.toml``; read only, never rewritten)."""
    from ..rec.pipeline import load_config

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml): run "
                                f"`sigma-fast demo --run {run_dir}` (or the stages) first")
    return load_config(path)


def load_backend(run_dir, variant: str = "sigma", device=None, *, cfg: dict | None = None,
                 batch_size: int = 32, factory: Callable | None = None) -> Backend:
    """The backend serving ``variant`` of a trained run on ``device`` (default CPU).

    ``factory(model, *, num_beams, top_m, adaptive, batch_size)`` builds it from the loaded
    ``SigmaModel`` (default: the eager ``Recommender``); num_beams / top_m come from the run's
    ``eval`` settings and APF is on except for the ``no_apf`` variant, as in ``evaluate`` and
    ``recommend``. ``batch_size`` is the most requests per forward pass.
    """
    from ..rec.generate import Recommender
    from ..rec.pipeline import load_variant

    cfg = cfg if cfg is not None else run_settings(run_dir)
    model = load_variant(run_dir, variant, device)
    make = factory if factory is not None else Recommender
    return make(model, num_beams=cfg["eval"]["num_beams"], top_m=cfg["eval"]["top_m"],
                adaptive=variant != "no_apf", batch_size=batch_size)


@dataclass
class Served:
    """What a front end needs of a run: its config, dataset, request builder and backend."""

    run_dir: Path
    variant: str
    cfg: dict
    requests: object          # sigma_fast.rec.requests.RequestBuilder
    backend: Backend

    @property
    def dataset(self):
        return self.requests.ds

    def items_of(self, out, row: int, top_n: int | None = None) -> list[dict]:
        """Row ``row`` of a ``Recommendations`` as ``{"id", "title", "score"}`` dicts (raw item
        ids, padding dropped), cut to ``top_n``."""
        ds = self.requests.ds
        ids = out.item_ids[row].tolist()
        scores = out.scores[row].tolist()
        if top_n is not None:
            ids, scores = ids[:top_n], scores[:top_n]
        return [{"id": ds.item_ids[i], "title": ds.item_titles[i], "score": float(s)}
                for i, s in zip(ids, scores) if i >= 0]

    def answer(self, requests: list) -> list:
        """The batch function of the server: ``[(TaskSample, top_n), ...]`` → one list of
        item dicts per request (or the exception that failed its group).

        The backend is called once with the batch's largest ``top_n`` and each answer cut to
        its own: SIGMA's and GR(ID)'s top n are the first n of any larger top n. GR(SID)'s are
        not (its beam width grows with top_n), so a GR(SID) backend — or one whose
        ``nested_top_n`` attribute is False — is called once per distinct ``top_n``."""
        nested = getattr(self.backend, "nested_top_n",
                         getattr(self.backend, "mode", "sigma") != "gr_sid")
        if nested:
            groups = {max(n for _, n in requests): list(range(len(requests)))}
        else:
            groups = {}
            for r, (_, n) in enumerate(requests):
                groups.setdefault(n, []).append(r)
        answers: list = [None] * len(requests)
        for top_n, rows in groups.items():
            try:
                out = self.backend([requests[r][0] for r in rows], top_n=top_n)
                for k, r in enumerate(rows):
                    answers[r] = self.items_of(out, k, requests[r][1])
            except Exception as exc:  # noqa: BLE001 - fails this group's requests only
                for r in rows:
                    answers[r] = exc
        return answers


def load_served(run_dir, variant: str = "sigma", device=None, *, split: str = "test",
                limits=None, batch_size: int = 32, backend: Backend | None = None,
                factory: Callable | None = None) -> Served:
    """Load a run for serving: config, dataset, :class:`RequestBuilder` and a backend (the
    given one, else :func:`load_backend`)."""
    from ..rec.pipeline import VARIANTS, request_builder

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected names from {VARIANTS}")
    run_dir = Path(run_dir)
    cfg = run_settings(run_dir)
    rb = request_builder(cfg, split=split, limits=limits)
    if backend is None:
        backend = load_backend(run_dir, variant, device, cfg=cfg, batch_size=batch_size,
                               factory=factory)
    num_items = getattr(getattr(backend, "model", None), "num_items", None)
    if num_items is not None and num_items != rb.ds.num_items:
        raise ValueError(f"the {variant} model of {run_dir} knows {num_items} items but the "
                         f"run's dataset has {rb.ds.num_items}: the run directory is "
                         f"inconsistent (retrain, or check data.dataset in config.toml)")
    return Served(run_dir, variant, cfg, rb, backend)

"""The model object the front ends call, and the run it serves.

A *backend* is any object with ``__call__(samples: list[TaskSample], *, top_n: int) ->
Recommendations`` (item indices best first, padding -1): the eager
:class:`sigma_fast.rec.generate.Recommender` (the default) or the static-shape
:class:`sigma_fast.serving.Engine` (``engine=True``). The HTTP server and the batch-offline job
only use that call, so any other object with it can be handed to them (``backend=``) or built
by :func:`load_backend` (``factory=``).

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
                 batch_size: int = 32, engine: bool = True, max_top_n: int = 100,
                 max_prompt: int = 512, factory: Callable | None = None) -> Backend:
    """The backend serving ``variant`` of a trained run on ``device`` (default CPU).

    Default (``engine=True``): the static-shape :class:`~sigma_fast.serving.Engine` with the
    run's ``eval`` num_beams / top_m and APF on except for the ``no_apf`` variant, sized for
    ``batch_size`` requests per run, answers of up to ``max_top_n`` items and prompts of up to
    ``max_prompt`` tokens (its buffers are allocated once). ``engine=False``: the eager
    ``Recommender`` with the same options (the same items; scores equal up to float
    rounding), as ``evaluate`` uses it. ``factory(model, *, num_beams,
    top_m, adaptive, batch_size)`` builds any other backend from the loaded ``SigmaModel``.
    """
    from ..rec.generate import Recommender
    from ..rec.pipeline import load_variant

    if factory is not None:
        engine = False
    cfg = cfg if cfg is not None else run_settings(run_dir)
    model = load_variant(run_dir, variant, device)
    options = {"num_beams": cfg["eval"]["num_beams"], "top_m": cfg["eval"]["top_m"],
               "adaptive": variant != "no_apf"}
    if engine:
        from .engine import Engine

        return Engine(model, device=device, top_n=max_top_n, max_batch=batch_size,
                      max_prompt=max_prompt, **options)
    make = factory if factory is not None else Recommender
    return make(model, batch_size=batch_size, **options)


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

    def check(self, sample) -> None:
        """Reject a request the backend cannot take before it reaches a batch: a prompt longer
        than a backend's declared ``max_prompt`` (the engine's buffers) is too large (413)."""
        limit = getattr(self.backend, "max_prompt", None)
        model = getattr(self.backend, "model", None)
        if limit is None or model is None:
            return
        n = len(model.encode(sample, with_label=False).input_ids)
        if n > limit:
            from ..rec.requests import RequestTooLarge

            raise RequestTooLarge(f"the request's prompt has {n} tokens; this server takes at "
                                  f"most {limit} (a shorter history or instruction)")

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
            except Exception as exc:  # noqa: BLE001 - isolate the request that failed
                if len(rows) == 1:
                    answers[rows[0]] = exc
                    continue
                for r in rows:  # one by one: a bad request must not fail its batch-mates
                    try:
                        out = self.backend([requests[r][0]], top_n=requests[r][1])
                        answers[r] = self.items_of(out, 0, requests[r][1])
                    except Exception as one:  # noqa: BLE001
                        answers[r] = one
        return answers


def load_served(run_dir, variant: str = "sigma", device=None, *, split: str = "test",
                limits=None, batch_size: int = 32, backend: Backend | None = None,
                engine: bool = True, factory: Callable | None = None) -> Served:
    """Load a run for serving: config, dataset, :class:`RequestBuilder` and a backend (the
    given one, else :func:`load_backend`; ``engine`` sizes the engine for ``limits``)."""
    from ..rec.pipeline import VARIANTS, request_builder

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected names from {VARIANTS}")
    run_dir = Path(run_dir)
    cfg = run_settings(run_dir)
    rb = request_builder(cfg, split=split, limits=limits)
    if backend is None:
        backend = load_backend(run_dir, variant, device, cfg=cfg, batch_size=batch_size,
                               engine=engine, max_top_n=rb.limits.max_top_n, factory=factory)
    num_items = getattr(getattr(backend, "model", None), "num_items", None)
    if num_items is not None and num_items != rb.ds.num_items:
        raise ValueError(f"the {variant} model of {run_dir} knows {num_items} items but the "
                         f"run's dataset has {rb.ds.num_items}: the run directory is "
                         f"inconsistent (retrain, or check data.dataset in config.toml)")
    return Served(run_dir, variant, cfg, rb, backend)

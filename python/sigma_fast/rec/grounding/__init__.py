"""Multi-view semantic grounding (DESIGN.md §1.1): relevance views, the collaborative ID teacher,
the grounding losses, the trainable text tower, and the grounding of a whole dataset.

Everything here works on plain arrays so it does not depend on a dataset class:

- item features: float32 [N, H] frozen text features (e.g. MiniLM or LM last-token states);
- interactions: parallel int arrays ``users``, ``items`` (and optional ``timestamps``) of the
  *training* split only;
- a view is a :class:`Pairs` ``(pairs int64 [P, 2], weights float32 [P])`` of related items.

>>> co = co_interaction_pairs(users, items, timestamps, num_items=n, window=3)
>>> attr = attribute_pairs(genres, years, k=10)
>>> nn = neighbour_pairs(minilm, k=10)
>>> view = merge_views(co, attr, nn)
>>> id_emb = train_bpr(users, items, num_users=u, num_items=n, seed=0)
>>> model = train_grounding(features, view.pairs, id_emb, weights=view.weights, dim=64)
>>> grounded = model.embed(features)                  # float32 [N, 64], unit rows
>>> recall_at_k(grounded, held_out.pairs, k=20)
>>> model.save("grounding_dir"); GroundingModel.load("grounding_dir")
>>> res = ground_dataset(ds, encoder="minilm")        # all of the above for a RecDataset

The same losses train the LM itself with :func:`train_text_tower` (a :class:`TextTower`: the
frozen LM's cached features + projection, or the LM's last ``n`` layers from cached hidden
states, or the whole LM with ``finetune="full"``):

>>> tower = train_text_tower(texts, view.pairs, id_emb, encoder="smollm2", train_layers=1)
>>> tower.embed_texts(new_texts)                      # float32 [M, 64], unit rows
>>> tower.save("tower_dir"); TextTower.load("tower_dir")

Modules: ``losses`` (L_CL, L_KD), ``views`` (relevance pairs), ``teacher`` (BPR), ``projection``
(:class:`GroundingModel` and the shared training loop), ``text`` (the LM: features, cached layer
inputs), ``tower`` (:class:`TextTower`), ``metrics`` (recall@k), ``ground`` (a dataset end to end).
"""

from .ground import GroundingResult, ground_dataset, held_out_pairs, training_interactions
from .losses import grounding_loss, info_nce_loss, kd_loss
from .metrics import agreement_report, recall_at_k
from .projection import GroundingModel, train_grounding
from .teacher import train_bpr
from .text import hashed_text_features
from .tower import TextTower, train_text_tower
from .views import Pairs, attribute_pairs, co_interaction_pairs, merge_views, neighbour_pairs

__all__ = [
    "GroundingModel",
    "GroundingResult",
    "Pairs",
    "TextTower",
    "agreement_report",
    "attribute_pairs",
    "co_interaction_pairs",
    "ground_dataset",
    "grounding_loss",
    "hashed_text_features",
    "held_out_pairs",
    "info_nce_loss",
    "kd_loss",
    "merge_views",
    "neighbour_pairs",
    "recall_at_k",
    "train_bpr",
    "train_grounding",
    "train_text_tower",
    "training_interactions",
]

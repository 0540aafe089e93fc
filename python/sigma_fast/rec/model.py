"""The SIGMA model (DESIGN.md §1.2-1.3): a Hugging Face causal LM that reads hybrid item tokens
and answers with SID prefix tokens followed by a query token ``<q>``.

- Input: the prompt text with every history item rendered as its hybrid token (SID prefix tokens,
  then the placeholder ``<item>`` whose input embedding is replaced by ``ṽ_i = ProjFuse(frozen
  item tables)``), fed through ``inputs_embeds``.
- Output: next-token logits over the SID prefix tokens (only the K rows of each level of the LM
  head are ever evaluated), and the hidden state at ``<q>`` projected by ``query_head`` into the
  item space where it is compared with ``ṽ`` by cosine similarity.

Modes (the variants of the evaluation):

- ``"sigma"``: label = the target's ℓ prefix tokens then ``<q>``; loss = next-token loss on the
  prefix tokens + InfoNCE between the projected ``<q>`` state and ``ṽ_target``, with negatives
  that share the target's prefix ("hard") plus the other targets of the batch.
- ``"gr_id"``: history items are ``<item>`` only, label = ``<q>``; InfoNCE only (retrieval over
  the whole catalogue).
- ``"gr_sid"``: history items are their full deduplicated SIDs (L + 1 tokens, no ``<item>``),
  label = the target's full SID; next-token loss only (generation = trie beam search).

>>> model = SigmaModel.from_preset("tiny", items)          # items: a fitted HybridItemTokenizer
>>> batch = model.collate([model.encode(s) for s in samples])
>>> out = model(batch)                                     # {"loss", "ntp", "nce"}
>>> model.save_pretrained("run/model"); SigmaModel.from_pretrained("run/model")
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf
from .._io import (Field, atomic_directory, atomic_save_tensors, atomic_write_json,
                   check_sha256, load_tensors, read_artifact_config, recorded_digests,
                   sha256_file)
from .tokenization import HybridItemTokenizer

__all__ = ["SigmaConfig", "SigmaModel", "EncodedSample", "MODES", "PRESETS",
           "load_backbone"]

MODES = ("sigma", "gr_id", "gr_sid")
PRESETS = ("tiny", "smollm2-135m")
FORMAT = "sigma_fast.SigmaModel"
FORMAT_VERSION = 2  # 2: sigma_model.json records the SHA-256 of every file it covers
CONFIG_FILE = "sigma_model.json"
HEADS_FILE = "heads.safetensors"
BACKBONE_DIR = "backbone"
ITEMS_DIR = "items"
_FIELDS = {"mode": Field("str", choices=MODES), "backbone": Field("str"),
           "tau": Field("float"), "nce_weight": Field("float", lo=0),
           "hard_negatives": Field("int", lo=0), "max_history": Field("int", lo=1),
           "sid_levels": Field("int", lo=1), "extra": Field("dict", optional=True),
           "dense_weight": Field("float", lo=0, optional=True),
           "negatives": Field("str", choices=("prefix", "catalogue"), optional=True),
           "subset_negatives": Field("bool", optional=True),
           "subset_weight": Field("float", lo=0, optional=True),
           "lora_rank": Field("int", lo=0, optional=True),
           "lora_alpha": Field("float", lo=0, optional=True),
           "trainable_ids": Field("bool", optional=True)}
NEGATIVES = ("prefix", "catalogue")


@dataclass
class SigmaConfig:
    """Everything besides the weights that defines a SIGMA model.

    Attributes:
        mode: "sigma", "gr_id" or "gr_sid" (see the module docstring).
        backbone: the preset or folder the backbone came from (informational).
        tau: InfoNCE temperature of the ``<q>`` / ``ṽ`` similarity.
        nce_weight: weight of the InfoNCE term against the next-token term.
        hard_negatives: negatives drawn from the target's prefix bucket per sample.
        max_history: history items rendered into a prompt (the most recent ones).
        sid_levels: SID levels that are tokens in the vocabulary (ℓ; L + 1 for gr_sid).
        dense_weight: weight of the dense history supervision (0 = off): every history item
            after the first is also a target — its prefix tokens by next-token loss from the
            tokens before it, and its ``ṽ`` by InfoNCE (over the whole catalogue) from the
            query head applied to the state just before its ``<item>`` slot — the way a
            sequential recommender learns from every transition of a sequence.
        negatives: the InfoNCE negatives of the label's ``<q>``: "prefix" (``hard_negatives``
            items sharing the target's prefix + the batch's other targets) or "catalogue"
            (a softmax over every item).
        subset_negatives: with "catalogue", a sample with an allowed subset (Category,
            Longtail, Discover, ...) draws its negatives from that subset only, as step 3 ranks
            only inside it.
        subset_weight: weight of an extra InfoNCE term (0 = off) for samples with an allowed
            subset: the label's ``<q>`` against every item of the subset, beside the
            ``negatives`` term, so the subset tasks learn to rank inside their subset while
            the other tasks keep their negatives.
        lora_rank: > 0 when the backbone was fine-tuned with LoRA adapters of this rank on its
            attention and MLP projections (the ``peft`` library; see
            :meth:`SigmaModel.enable_lora`); a saved model holds the merged weights.
        lora_alpha: the LoRA scale numerator (the update is ``alpha / rank · B A``).
        trainable_ids: add a trained per-item vector (zero at the start) to ``ṽ``, so SFT can
            move items that the frozen tables place badly for this task mix.
    """

    mode: str = "sigma"
    backbone: str = "tiny"
    tau: float = 0.07
    nce_weight: float = 1.0
    hard_negatives: int = 16
    max_history: int = 20
    sid_levels: int = 1
    extra: dict = field(default_factory=dict)
    dense_weight: float = 0.0
    negatives: str = "prefix"
    subset_negatives: bool = False
    subset_weight: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    trainable_ids: bool = False

    def check(self) -> "SigmaConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0; got {self.tau!r}")
        if self.nce_weight < 0 or self.hard_negatives < 0 or self.max_history < 1:
            raise ValueError(f"nce_weight and hard_negatives must be >= 0 and max_history >= 1; "
                             f"got {self.nce_weight}, {self.hard_negatives}, {self.max_history}")
        if not self.dense_weight >= 0:
            raise ValueError(f"dense_weight must be >= 0; got {self.dense_weight!r}")
        if not self.subset_weight >= 0:
            raise ValueError(f"subset_weight must be >= 0; got {self.subset_weight!r}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}; got {self.negatives!r}")
        return self


@dataclass
class EncodedSample:
    """One prompt (+ label) as token ids. ``item_slots``/``item_ids``: positions of ``<item>``
    placeholders and the item each one stands for; ``label_start``: index of the first label
    token (== len(prompt ids)); ``label_codes``: the SID code of each label level;
    ``history_end``: index just after the last history token. Everything before it (profile
    and history) is the user's part of the prompt, shared by all of the user's tasks; the
    instruction follows it. ``history_starts``: index of each rendered history item's first
    token (``history_items`` are those items); ``allowed``: the sample's allowed subset."""

    input_ids: list[int]
    item_slots: list[int]
    item_ids: list[int]
    label_start: int
    label_codes: list[int]
    target: int
    history_end: int = -1
    history_starts: list[int] = field(default_factory=list)
    history_items: list[int] = field(default_factory=list)
    allowed: np.ndarray | None = None


# ------------------------------------------------------------------------------ backbones
def _tiny_tokenizer():
    """The tokenizer of the ``tiny`` preset: all-MiniLM-L6-v2's WordPiece vocabulary (30k
    tokens, from its installed package)."""
    from transformers import AutoTokenizer

    from .assets import encoder_dir

    return AutoTokenizer.from_pretrained(encoder_dir("minilm"))


def load_backbone(preset: str, *, num_layers: int | None = None, hidden_size: int = 128,
                  seed: int = 0):
    """(causal LM, tokenizer) of a preset or a Hugging Face model folder.

    ``tiny``: a 2-layer Llama-style model (hidden ``hidden_size``) initialised randomly with
    ``seed``, on the MiniLM WordPiece tokenizer; for tests and quick CPU runs.
    ``smollm2-135m``: the pretrained SmolLM2-135M-Instruct (see ``sigma_fast.models``).
    ``num_layers`` keeps only the first n decoder layers (cheaper CPU training).
    """
    _hf.offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if preset == "tiny":
        tok = _tiny_tokenizer()
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size,
                          intermediate_size=2 * hidden_size, num_hidden_layers=num_layers or 2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
        model = LlamaForCausalLM(cfg)
    else:
        if preset == "smollm2-135m":
            from .assets import smollm2_dir

            folder = smollm2_dir()
        else:
            folder = Path(preset)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"backbone must be one of {PRESETS} or a Hugging Face "
                                        f"model folder with config.json; got {preset!r}")
        tok = AutoTokenizer.from_pretrained(folder, **_hf.local_tokenizer_kwargs())
        with _hf.quiet():
            model = AutoModelForCausalLM.from_pretrained(
                folder, **_hf.local_model_kwargs(torch.float32))
        if num_layers is not None:
            layers = _decoder_layers(model)
            if not 1 <= num_layers <= len(layers):
                raise ValueError(f"num_layers must be in [1, {len(layers)}]; got {num_layers}")
            del layers[num_layers:]
            model.config.num_hidden_layers = num_layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:num_layers]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _decoder_layers(model) -> nn.ModuleList:
    base = model.base_model
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} to truncate")
    return layers


# ------------------------------------------------------------------------------ the model
class SigmaModel(nn.Module):
    """A SIGMA recommender: backbone LM + extended tokenizer + hybrid item tokenizer (RQ codes,
    frozen item tables, Proj&Fuse) + the ``<q>`` query head."""

    def __init__(self, backbone, tokenizer, items: HybridItemTokenizer,
                 config: SigmaConfig | None = None):
        super().__init__()
        self.config = (config or SigmaConfig()).check()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.items = items
        items._require_fitted()
        levels = items.num_levels + 1 if self.config.mode == "gr_sid" else items.prefix_len
        self.config.sid_levels = levels
        # Always through the tokenizer at hand (idempotent): ids recorded for another
        # tokenizer (the item tokenizer reused for a second model) would be wrong here.
        items.extend_tokenizer(tokenizer, levels=levels)
        if backbone.get_input_embeddings().weight.shape[0] < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        hidden = backbone.config.hidden_size
        if items.proj_fuse is None or items.proj_fuse.hidden_size != hidden:
            items.build_proj_fuse(hidden)
        self.proj_fuse = items.proj_fuse  # registered so .parameters()/DDP see it
        self.query_head = nn.Linear(hidden, hidden)
        self.id_residual = None
        if self.config.trainable_ids:
            self.id_residual = nn.Embedding(items.num_items, hidden)
            nn.init.zeros_(self.id_residual.weight)
        self.vocab = items.vocab  # SIDVocab: code c of level l is token vocab.token_offsets[l] + c
        self.query_token_id = int(items.token_ids["query"])
        self.item_token_id = int(items.token_ids["item"])
        self.codes = torch.from_numpy(items.full_codes() if self.config.mode == "gr_sid"
                                      else items.prefix_codes())  # [N, levels]
        # token ids of every item's SID (prefix) codes, looked up once for prompt encoding
        self._item_sids: list[list[int]] = self.vocab.token_ids(self.codes).tolist()
        self._bucket_cache = None
        self._text_cache: dict[str, tuple[int, ...]] = {}
        self._peft = None  # the peft wrapper while LoRA adapters are attached (not a submodule)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, preset: str, items: HybridItemTokenizer, *, mode: str = "sigma",
                    num_layers: int | None = None, hidden_size: int = 128, seed: int = 0,
                    lora_rank: int = 0, lora_alpha: float | None = None,
                    lora_layers: int | None = None, **config) -> "SigmaModel":
        """A new (untrained) model on a preset or folder backbone (see :func:`load_backbone`);
        ``lora_rank`` > 0 attaches LoRA adapters (:meth:`enable_lora`) to the first
        ``lora_layers`` layers (all when None)."""
        backbone, tok = load_backbone(preset, num_layers=num_layers, hidden_size=hidden_size,
                                      seed=seed)
        cfg = SigmaConfig(mode=mode, backbone=preset, **config)
        torch.manual_seed(seed)
        model = cls(backbone, tok, items, cfg)
        if lora_rank:
            model.enable_lora(lora_rank, lora_alpha, layers=lora_layers)
        return model

    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def enable_lora(self, rank: int = 8, alpha: float | None = None, *,
                    layers: int | None = None) -> int:
        """Fine-tune the backbone with LoRA adapters (``peft``): rank-``rank`` updates of every
        attention and MLP projection of the first ``layers`` decoder layers (all when None); the
        pretrained weights are frozen except the token embeddings (tied to the LM head), which
        hold the new SID, ``<item>`` and ``<q>`` tokens. Proj&Fuse and the query head stay
        trainable. :meth:`save_pretrained` writes the merged weights, so a saved model loads as
        a plain backbone. Returns the number of trainable parameters."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ImportError("LoRA fine-tuning needs the peft package: pip install "
                              "'sigma_fast[lora]'") from exc
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int; got {rank!r}")
        if self._peft is not None:
            raise RuntimeError("LoRA adapters are already attached to this model")
        alpha = float(2 * rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0; got {alpha!r}")
        n_layers = len(_decoder_layers(self.backbone))
        if layers is not None and not 1 <= layers <= n_layers:
            raise ValueError(f"LoRA layers must be in [1, {n_layers}]; got {layers!r}")
        present = {name.rsplit(".", 1)[-1] for name, _ in self.backbone.named_modules()}
        targets = [t for t in self.LORA_TARGETS if t in present]
        if not targets:
            raise ValueError(f"the backbone ({type(self.backbone).__name__}) has none of the "
                             f"projections LoRA targets: {self.LORA_TARGETS}")
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                         layers_to_transform=None if layers is None else list(range(layers)))
        # get_peft_model injects the adapters into self.backbone in place and freezes the rest
        self._peft = get_peft_model(self.backbone, cfg)
        self.backbone.get_input_embeddings().weight.requires_grad_(True)
        self.config.lora_rank, self.config.lora_alpha = rank, alpha
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _backbone_to_save(self):
        """The backbone as a plain Hugging Face model: with LoRA, a copy with the adapters
        merged into the weights (``peft``'s ``merge_and_unload``)."""
        if self._peft is None:
            return self.backbone
        import copy

        return copy.deepcopy(self._peft).merge_and_unload()

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def num_items(self) -> int:
        return self.items.num_items

    # ------------------------------------------------------------------ prompt encoding
    def _text_ids(self, text: str) -> tuple[int, ...]:
        ids = self._text_cache.get(text)  # profile and instruction texts repeat across samples
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._text_cache) < 200_000:
                self._text_cache[text] = ids
        return ids

    def _item_tokens(self, item: int) -> tuple[list[int], bool]:
        """Token ids of one history item and whether its last token is an ``<item>`` slot."""
        sid = self._item_sids[item]
        if self.config.mode == "gr_sid":
            return list(sid), False
        if self.config.mode == "gr_id":
            return [self.item_token_id], True
        return sid + [self.item_token_id], True

    def encode(self, sample, *, with_label: bool = True) -> EncodedSample:
        """Token ids of a ``TaskSample`` (its prompt with the history rendered as hybrid
        tokens; with ``with_label`` also the target's label tokens)."""
        from .data.tasks import HISTORY_PLACEHOLDER

        before, sep, after = sample.prompt.partition(HISTORY_PLACEHOLDER)
        if not sep:
            raise ValueError(f"sample prompt has no {HISTORY_PLACEHOLDER} slot: "
                             f"{sample.prompt[:80]!r}")
        bos = self.tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + list(self._text_ids(before))
        slots, items, starts = [], [], []
        history = np.asarray(sample.history)[-self.config.max_history:].tolist()
        for item in history:
            if not 0 <= item < self.num_items:
                raise IndexError(f"history item {item} is outside the catalogue [0, "
                                 f"{self.num_items})")
            toks, slot = self._item_tokens(item)
            starts.append(len(ids))
            ids += toks
            if slot:
                slots.append(len(ids) - 1)
                items.append(item)
        history_end = len(ids)
        ids += list(self._text_ids(after))
        label_start = len(ids)
        target = int(sample.target) if sample.target is not None else -1
        label_codes: list[int] = []
        if with_label:
            if not 0 <= target < self.num_items:
                raise IndexError(f"target {target} is outside the catalogue [0, "
                                 f"{self.num_items})")
            if self.config.mode != "gr_id":
                label_codes = self.codes[target].tolist()
                ids += self._item_sids[target]
            if self.config.mode != "gr_sid":
                ids.append(self.query_token_id)
        allowed = getattr(sample, "allowed", None)
        return EncodedSample(ids, slots, items, label_start, label_codes, target, history_end,
                             starts, history, allowed)

    def collate(self, encoded: list[EncodedSample], *, padding_side: str = "right") -> dict:
        """Pad a list of encoded samples into a batch of tensors (right padding for training,
        left padding for generation)."""
        if not encoded:
            raise ValueError("cannot collate an empty list of samples")
        pad = self.tokenizer.pad_token_id or 0
        t = max(len(e.input_ids) for e in encoded)
        b = len(encoded)
        input_ids = torch.full((b, t), pad, dtype=torch.int64)
        mask = torch.zeros((b, t), dtype=torch.int64)
        slot_items = torch.full((b, t), -1, dtype=torch.int64)
        label_pos = torch.zeros(b, dtype=torch.int64)
        for r, e in enumerate(encoded):
            n = len(e.input_ids)
            off = 0 if padding_side == "right" else t - n
            input_ids[r, off:off + n] = torch.tensor(e.input_ids)
            mask[r, off:off + n] = 1
            if e.item_slots:
                slot_items[r, torch.tensor(e.item_slots) + off] = torch.tensor(e.item_ids)
            label_pos[r] = e.label_start + off
        levels = len(encoded[0].label_codes)
        batch = {
            "input_ids": input_ids, "attention_mask": mask, "slot_items": slot_items,
            "label_pos": label_pos,
            "label_codes": torch.tensor([e.label_codes for e in encoded],
                                        dtype=torch.int64).reshape(b, levels),
            "target": torch.tensor([e.target for e in encoded], dtype=torch.int64),
        }
        if self.config.dense_weight > 0:
            # every history item after the first is a target of the tokens before it
            rows, starts, items = [], [], []
            for r, e in enumerate(encoded):
                off = 0 if padding_side == "right" else t - len(e.input_ids)
                rows += [r] * max(len(e.history_starts) - 1, 0)
                starts += [st + off for st in e.history_starts[1:]]
                items += e.history_items[1:]
            batch["dense_rows"] = torch.tensor(rows, dtype=torch.int64)
            batch["dense_starts"] = torch.tensor(starts, dtype=torch.int64)
            batch["dense_items"] = torch.tensor(items, dtype=torch.int64)
        if (self.config.negatives == "catalogue" and self.config.subset_negatives) \
                or self.config.subset_weight > 0:
            batch["allowed"] = [e.allowed for e in encoded]
        return batch

    # ------------------------------------------------------------------ embeddings
    def item_embeddings(self, item_ids=None) -> torch.Tensor:
        """``ṽ`` [n, hidden] of the given items (all items when None)."""
        if item_ids is None:
            item_ids = torch.arange(self.num_items)
        v = self.items.item_embeddings(item_ids)
        if self.id_residual is not None:
            v = v + self.id_residual(torch.as_tensor(item_ids).to(v.device))
        return v

    def input_embeddings(self, input_ids: torch.Tensor, slot_items: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every ``<item>`` slot replaced by its item's ``ṽ``."""
        emb = self.backbone.get_input_embeddings()(input_ids)
        where = slot_items >= 0
        if bool(where.any()):
            uniq, inv = torch.unique(slot_items[where], return_inverse=True)
            v = self.item_embeddings(uniq).to(emb.dtype)
            emb = emb.masked_scatter(where[..., None], v[inv])
        return emb

    def query_embeddings(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit query vectors from ``<q>`` hidden states [..., hidden]."""
        return F.normalize(self.query_head(hidden), dim=-1)

    def sid_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Logits of level ``level``'s K code tokens from hidden states [..., hidden] (only
        those rows of the LM head are evaluated)."""
        head = self.backbone.get_output_embeddings()
        rows = self.vocab.level_slice(level)  # consecutive ids: a view of the head, no gather
        logits = hidden @ head.weight[rows].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[rows]
        return logits

    def _hidden(self, batch: dict) -> torch.Tensor:
        dev = self.device
        emb = self.input_embeddings(batch["input_ids"].to(dev), batch["slot_items"].to(dev))
        mask = batch["attention_mask"].to(dev)
        out = self.backbone.base_model(inputs_embeds=emb, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    def bucket_members(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items sorted by prefix, bucket offsets, bucket of each item) for hard negatives."""
        if self._bucket_cache is None:
            codes = self.items.prefix_codes()
            _, bucket = np.unique(codes, axis=0, return_inverse=True)
            bucket = bucket.reshape(-1)
            order = np.argsort(bucket, kind="stable")
            offsets = np.zeros(bucket.max() + 2, dtype=np.int64)
            np.add.at(offsets, bucket + 1, 1)
            self._bucket_cache = (torch.from_numpy(order), torch.from_numpy(np.cumsum(offsets)),
                                  torch.from_numpy(bucket.astype(np.int64)))
        return self._bucket_cache

    def _hard_negatives(self, target: torch.Tensor, generator=None) -> torch.Tensor:
        """int64 [B, n]: items sharing each target's prefix (sampled with replacement; -1 when
        the bucket holds only the target)."""
        n = self.config.hard_negatives
        order, offsets, bucket = self.bucket_members()
        b = bucket[target]
        lo, size = offsets[b], offsets[b + 1] - offsets[b]
        r = torch.rand((target.shape[0], n), generator=generator)
        pick = order[lo[:, None] + (r * size[:, None]).long().clamp(max=(size - 1)[:, None])]
        return pick.masked_fill(pick == target[:, None], -1)

    # ------------------------------------------------------------------ the loss
    def forward(self, batch: dict, generator=None) -> dict:
        """Training loss of a right-padded batch from ``collate``: {"loss", "ntp", "nce"}."""
        hidden = self._hidden(batch)
        dev = hidden.device
        rows = torch.arange(hidden.shape[0], device=dev)
        label_pos = batch["label_pos"].to(dev)
        zero = hidden.new_zeros(())
        ntp = zero
        codes = batch["label_codes"].to(dev)
        for level in range(codes.shape[1]):
            h = hidden[rows, label_pos + level - 1]  # the token before label token `level`
            ntp = ntp + F.cross_entropy(self.sid_logits(h, level), codes[:, level])
        if codes.shape[1]:
            ntp = ntp / codes.shape[1]
        nce = zero
        catalogue = None  # unit ṽ of every item, computed once per step when needed
        if self.config.mode != "gr_sid" and (self.config.negatives == "catalogue"
                                             or self.config.dense_weight > 0):
            catalogue = F.normalize(self.item_embeddings(), dim=-1)  # [N, H]
        if self.config.mode != "gr_sid" and self.config.negatives == "catalogue":
            q = self.query_embeddings(hidden[rows, label_pos + codes.shape[1]])
            logits = self._catalogue_logits(                         # [B, N]
                q, catalogue, batch["allowed"] if self.config.subset_negatives else None)
            nce = F.cross_entropy(logits, batch["target"].to(dev))
        elif self.config.mode != "gr_sid":
            q_pos = label_pos + codes.shape[1]
            q = self.query_embeddings(hidden[rows, q_pos])           # [B, H]
            target = batch["target"]
            if self.config.mode == "sigma" and self.config.hard_negatives:
                hard = self._hard_negatives(target, generator)       # [B, n]
            else:
                hard = torch.empty((target.shape[0], 0), dtype=torch.int64)
            uniq, inv = torch.unique(torch.cat([target, hard.reshape(-1).clamp(min=0)]),
                                     return_inverse=True)
            v = F.normalize(self.item_embeddings(uniq), dim=-1)      # [U, H]
            t_idx = inv[: target.shape[0]].to(dev)
            h_idx = inv[target.shape[0]:].reshape(hard.shape).to(dev)
            s_batch = q @ v[t_idx].T                                 # [B, B]
            same = target[:, None].to(dev) == target[None, :].to(dev)
            s_batch = s_batch.masked_fill(same & ~torch.eye(len(target), dtype=torch.bool,
                                                            device=dev), float("-inf"))
            s_hard = (q[:, None, :] * v[h_idx]).sum(-1)              # [B, n]
            s_hard = s_hard.masked_fill(hard.to(dev) < 0, float("-inf"))
            logits = torch.cat([s_batch, s_hard], dim=1) / self.config.tau
            nce = F.cross_entropy(logits, rows)
        loss = ntp + self.config.nce_weight * nce
        out = {"loss": loss, "ntp": ntp.detach(), "nce": nce.detach()}
        if self.config.subset_weight > 0 and self.config.mode != "gr_sid":
            has = [r for r, a in enumerate(batch.get("allowed") or []) if a is not None]
            if has:
                if catalogue is None:
                    catalogue = F.normalize(self.item_embeddings(), dim=-1)
                pick = torch.tensor(has, dtype=torch.int64)
                logits = self._catalogue_logits(q[pick.to(dev)], catalogue,
                                                [batch["allowed"][r] for r in has])
                subset = F.cross_entropy(logits, batch["target"][pick].to(dev))
                out["loss"] = out["loss"] + self.config.subset_weight * subset
                out["subset"] = subset.detach()
        if self.config.dense_weight > 0 and batch.get("dense_items") is not None \
                and batch["dense_items"].numel():
            dense = self._dense_loss(hidden, batch, catalogue)
            out["loss"] = out["loss"] + self.config.dense_weight * dense
            out["dense"] = dense.detach()
        return out

    def _dense_loss(self, hidden: torch.Tensor, batch: dict,
                    catalogue: torch.Tensor | None) -> torch.Tensor:
        """Next-token loss of every history item's prefix tokens (after the first item) and
        InfoNCE over the catalogue between the query head at the token before its ``<item>``
        slot and its ``ṽ`` (see ``SigmaConfig.dense_weight``)."""
        dev = hidden.device
        rows = batch["dense_rows"].to(dev)
        starts = batch["dense_starts"].to(dev)
        items = batch["dense_items"]
        levels = self.codes.shape[1] if self.config.mode != "gr_id" else 0
        loss = hidden.new_zeros(())
        if levels:
            codes = self.codes[items].to(dev)                        # [D, levels]
            for level in range(levels):
                h = hidden[rows, starts + level - 1]
                loss = loss + F.cross_entropy(self.sid_logits(h, level), codes[:, level])
            loss = loss / levels
        if catalogue is not None:
            q = self.query_embeddings(hidden[rows, starts + levels - 1])
            loss = loss + self.config.nce_weight * F.cross_entropy(
                self._catalogue_logits(q, catalogue, None), items.to(dev))
        return loss

    def _catalogue_logits(self, q: torch.Tensor, catalogue: torch.Tensor,
                          allowed: list | None) -> torch.Tensor:
        """[B, N] similarities of ``q`` to every item over τ; with ``allowed``, the items
        outside each row's allowed subset are -inf."""
        logits = q @ catalogue.T / self.config.tau
        if allowed is not None:
            logits = logits.masked_fill(~self._subset_mask(allowed, q.device), float("-inf"))
        return logits

    def _subset_mask(self, allowed: list, device) -> torch.Tensor:
        """bool [B, N]: each sample's allowed subset (every item where it has none)."""
        mask = torch.ones((len(allowed), self.num_items), dtype=torch.bool)
        for r, a in enumerate(allowed):
            if a is not None:
                mask[r] = False
                mask[r, torch.from_numpy(np.asarray(a, dtype=np.int64))] = True
        return mask.to(device)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the whole model into ``directory`` (backbone + tokenizer as a
        ``save_pretrained`` folder, the hybrid item tokenizer with Proj&Fuse, the query head
        and ``sigma_model.json``, which records the SHA-256 of every backbone file and of the
        heads). The directory is assembled beside the target and renamed into place, so a
        reader never sees a half-written model."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            with _hf.quiet():
                self._backbone_to_save().save_pretrained(tmp / BACKBONE_DIR)
            self.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
            self.items.save(tmp / ITEMS_DIR)
            heads = {f"query_head.{k}": v for k, v in self.query_head.state_dict().items()}
            if self.id_residual is not None:
                heads["id_residual.weight"] = self.id_residual.weight.detach()
            atomic_save_tensors(tmp / HEADS_FILE, heads, metadata={"format": FORMAT})
            files = [HEADS_FILE] + _backbone_files(tmp)
            atomic_write_json(tmp / CONFIG_FILE, {
                "format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self.config),
                "files_sha256": {f: sha256_file(tmp / f) for f in files}})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None) -> "SigmaModel":
        """Load a model written by :meth:`save_pretrained`. Reads JSON, text tokenizer files
        and safetensors only (never a pickle, never code from the folder): every field of
        ``sigma_model.json`` is checked, every file of ``backbone/`` and the heads must match
        the SHA-256 it records (and ``backbone/`` may hold no other file), and the item
        tokenizer is verified by :meth:`HybridItemTokenizer.load`."""
        _hf.offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, path, cfg = read_artifact_config(directory, CONFIG_FILE, FORMAT,
                                                    FORMAT_VERSION, "a SIGMA model", _FIELDS)
        fields = {k: v for k, v in cfg.items() if k in SigmaConfig.__dataclass_fields__}
        try:
            config = SigmaConfig(**fields).check()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        present = [HEADS_FILE] + _backbone_files(directory)
        recorded = cfg.get("files_sha256")
        listed = sorted(recorded) if isinstance(recorded, dict) else present
        digests = recorded_digests(cfg, path, listed, since=2)
        if recorded is not None:
            extra = sorted(set(present) - set(listed))
            if extra:
                raise ValueError(f"{directory}: {extra} are not part of the saved model (not in "
                                 f"{CONFIG_FILE}'s files_sha256); remove them")
            for name in listed:
                if name != HEADS_FILE:
                    check_sha256(directory / name, None, digests[name], path)
        tok = AutoTokenizer.from_pretrained(directory / BACKBONE_DIR,
                                            **_hf.local_tokenizer_kwargs())
        with _hf.quiet():
            backbone = AutoModelForCausalLM.from_pretrained(
                directory / BACKBONE_DIR, **_hf.local_model_kwargs(torch.float32))
        items = HybridItemTokenizer.load(directory / ITEMS_DIR)
        model = cls(backbone, tok, items, config)
        heads = load_tensors(directory / HEADS_FILE, sha256=digests.get(HEADS_FILE),
                             config_path=path)
        state = {k[len("query_head."):]: v for k, v in heads.items()
                 if k.startswith("query_head.")}
        try:
            model.query_head.load_state_dict(state)
            if model.id_residual is not None:
                if "id_residual.weight" not in heads:
                    raise RuntimeError("trainable_ids is set but id_residual.weight is missing")
                model.id_residual.load_state_dict({"weight": heads["id_residual.weight"]})
        except RuntimeError as exc:
            raise ValueError(f"{directory / HEADS_FILE} does not match the model in {path}: "
                             f"{exc}") from exc
        model.eval()
        return model.to(device) if device is not None else model


def _backbone_files(directory: Path) -> list[str]:
    """Every file under ``directory/backbone`` (the LM and its tokenizer), as relative paths."""
    root = directory / BACKBONE_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"expected the backbone folder {root}; it does not exist")
    return sorted(p.relative_to(directory).as_posix() for p in root.rglob("*") if p.is_file())

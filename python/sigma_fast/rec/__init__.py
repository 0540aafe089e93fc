"""The SIGMA application on top of the ops library (DESIGN.md §1-2): datasets and the seven
instruction tasks (``data``), multi-view semantic grounding (``grounding``), hybrid item
tokenization (``tokenization``), the SIGMA model (``model``), multi-task SFT (``train``),
three-step generation (``generate``), evaluation and baselines (``evaluation``, ``baselines``),
and the run-directory pipeline behind the command line (``pipeline``).

>>> from sigma_fast.rec import HybridItemTokenizer, SigmaModel, Recommender, train_sigma
"""

from .generate import Recommendations, Recommender, recommend
from .model import SigmaConfig, SigmaModel
from .tokenization import HybridItemTokenizer, ProjFuse, default_codebook_size
from .train import TrainConfig, train_sigma

__all__ = ["HybridItemTokenizer", "ProjFuse", "Recommendations", "Recommender", "SigmaConfig",
           "SigmaModel", "TrainConfig", "default_codebook_size", "recommend", "train_sigma"]

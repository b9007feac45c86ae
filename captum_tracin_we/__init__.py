r"""
captum-tracin-we: training-data influence through the word-embedding layer, with
word-level scores, as Captum influence methods: TracIn-WE (`TracInWE`) and
influence functions with K-FAC / EK-FAC curvature and ASTRA (`InfluenceWE`).
"""

from captum_tracin_we._core.index import (
    CorruptIndexError,
    GradientIndex,
    IndexBuildInProgressError,
    IndexMismatchError,
    ShardedIndex,
)
from captum_tracin_we._core.token_gradients import TokenGradients, TokenPostings
from captum_tracin_we._core.token_major import TokenMajorGradients
from captum_tracin_we._core.curvature import Curvature
from captum_tracin_we._core.influence_we import InfluenceWE
from captum_tracin_we._core.tracin_we import TracInWE, WordInfluence
from captum_tracin_we._utils.captum_compat import KMostInfluentialResults
from captum_tracin_we._utils.checkpoints import load_checkpoint, save_checkpoint, trainer_checkpoints
from captum_tracin_we.models import HuggingFaceClassifier

__version__ = "0.1.0"

__all__ = [
    "TracInWE",
    "InfluenceWE",
    "Curvature",
    "WordInfluence",
    "TokenGradients",
    "TokenPostings",
    "TokenMajorGradients",
    "GradientIndex",
    "ShardedIndex",
    "IndexMismatchError",
    "CorruptIndexError",
    "IndexBuildInProgressError",
    "KMostInfluentialResults",
    "load_checkpoint",
    "save_checkpoint",
    "trainer_checkpoints",
    "HuggingFaceClassifier",
]

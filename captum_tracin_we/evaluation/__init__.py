r"""
Evaluation of influence scores, for any Captum influence method: the linear
datamodeling score (LDS: retraining on seeded random subsets), further training
of the final model without each of a sample of training examples, case deletion
(retraining without each method's top-k proponents or opponents), mislabel
detection by self-influence (label flipping, ROC curve and AUC, the fraction
found in the top x%), Quanda's heuristics (identical class, top-k cardinality,
model randomisation), the cancellation ratio, and an embedding-similarity
baseline.

Every function takes plain tensors of scores, or a retraining function you
pass, so it applies equally to `TracInWE`, Captum's `TracInCP` and
`TracInCPFast`, or any other ranking.
"""

from captum_tracin_we.evaluation.baselines import embedding_similarity, label_agreement, pooled_embeddings
from captum_tracin_we.evaluation.case_deletion import (
    case_deletion,
    CaseDeletionResults,
    DeletionEffect,
    SameOrderSampler,
    top_k_training_indices,
)
from captum_tracin_we.evaluation.datamodels import (
    datamodel_outputs,
    DatamodelingScore,
    datamodeling_scores,
    draw_subsets,
    label_margin,
    linear_datamodeling_score,
    subset_key,
)
from captum_tracin_we.evaluation.further_training import (
    further_train,
    further_training_correlation,
    further_training_gold,
)
from captum_tracin_we.evaluation.heuristics import (
    identical_class,
    randomization_correlation,
    randomized_model,
    top_k_cardinality,
)
from captum_tracin_we.evaluation.quanda_adapter import QuandaExplainer
from captum_tracin_we.evaluation.metrics import (
    cancellation_ratio,
    flip_labels,
    fraction_found,
    mean_and_interval,
    roc_auc,
    roc_curve,
    spearman,
)

__all__ = [
    "linear_datamodeling_score",
    "datamodeling_scores",
    "datamodel_outputs",
    "subset_key",
    "DatamodelingScore",
    "draw_subsets",
    "label_margin",
    "spearman",
    "further_train",
    "further_training_gold",
    "further_training_correlation",
    "identical_class",
    "top_k_cardinality",
    "randomization_correlation",
    "randomized_model",
    "QuandaExplainer",
    "mean_and_interval",
    "case_deletion",
    "CaseDeletionResults",
    "DeletionEffect",
    "SameOrderSampler",
    "top_k_training_indices",
    "embedding_similarity",
    "label_agreement",
    "pooled_embeddings",
    "cancellation_ratio",
    "flip_labels",
    "fraction_found",
    "roc_auc",
    "roc_curve",
]

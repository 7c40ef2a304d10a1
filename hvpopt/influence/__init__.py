"""Influence functions: which training examples are responsible for a prediction.

``scores[q, j] ~ L_q(theta_without_j) - L_q(theta)``; see :mod:`hvpopt.influence.scores`.
"""

from hvpopt.influence.agreement import pearson, spearman
from hvpopt.influence.datamodels import (
    LinearDatamodelingScore,
    datamodel_losses,
    datamodel_subsets,
    linear_datamodeling_score,
    subset_predictions,
)
from hvpopt.influence.example_loss import check_example_loss, example_loss
from hvpopt.influence.factored import (
    SCORE_DTYPES,
    FactoredDirections,
    factored_directions_like,
    factored_query_directions,
    factored_score_blocks,
    factored_scoring_memory,
    factored_self_score_blocks,
)
from hvpopt.influence.gradients import flat_example_gradients, gradient_chunks
from hvpopt.influence.inverse_curvature import (
    CURVATURES,
    DEFAULT_MC_SAMPLES,
    MAX_EXACT_PARAMETERS,
    METHODS,
    InverseCurvature,
    curvature_operator,
    eigen_inverse,
    fit_inverse_curvature,
    kronecker_inverse_rows,
)
from hvpopt.influence.memory import kronecker_memory
from hvpopt.influence.proximal_bregman import proximal_bregman_response
from hvpopt.influence.scores import (
    pairwise_scores,
    query_directions,
    score_blocks,
    self_score_blocks,
    self_scores,
)
from hvpopt.influence.validation import (
    agreement,
    flipped_label_recall,
    leave_one_out_changes,
    proximal_bregman_changes,
    retrain,
)

__all__ = [
    "CURVATURES",
    "DEFAULT_MC_SAMPLES",
    "FactoredDirections",
    "MAX_EXACT_PARAMETERS",
    "METHODS",
    "SCORE_DTYPES",
    "InverseCurvature",
    "LinearDatamodelingScore",
    "agreement",
    "check_example_loss",
    "curvature_operator",
    "datamodel_losses",
    "datamodel_subsets",
    "eigen_inverse",
    "example_loss",
    "factored_directions_like",
    "factored_query_directions",
    "factored_score_blocks",
    "factored_scoring_memory",
    "factored_self_score_blocks",
    "fit_inverse_curvature",
    "flat_example_gradients",
    "flipped_label_recall",
    "gradient_chunks",
    "kronecker_inverse_rows",
    "kronecker_memory",
    "leave_one_out_changes",
    "linear_datamodeling_score",
    "pairwise_scores",
    "pearson",
    "proximal_bregman_changes",
    "proximal_bregman_response",
    "query_directions",
    "retrain",
    "score_blocks",
    "self_score_blocks",
    "self_scores",
    "spearman",
    "subset_predictions",
]

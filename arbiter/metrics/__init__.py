"""Pure metric functions on tensors: logit lens, Phi, MAM, LDAR, I_NSSD, MFR, head scores, imbalance, keys, Shapley.

They never touch a model; each returns a tensor, a float or a small dataclass with ``to_dict()``."""

from .head_scores import HeadScores, answer_direction, head_scores, spearman, top_g, topk_overlap
from .imbalance import IMBALANCE_METHODS, ImbalanceResult, attention_imbalance
from .keyspace import (KERNELS, JSDResult, KeySpaceResult, MMDResult, PCAResult, keyspace_analysis, keyspace_jsd,
                       keyspace_mmd, kernel_matrix, median_bandwidth, mmd2_unbiased, pooled_pca, subsample)
from .ldar import LDARResult, latent_decision, ldar, topk_positions
from .logit_lens import (SIGNALS, MAMComponents, TargetProfile, logit_lens, mam, mam_by_target, mam_components,
                   mam_from_hidden, signal)
from .mfr import (MATCH_MODES, MENTIONS, AnswerReading, MFRResult, answer_follows, first_line, mention_counts, mfr,
                  mfr_from_follows, mfr_from_pi, normalise, read_answer)
from .nssd import NSSD_METHODS, NSSDResult, answer_prob, compliance_prob, i_nssd, i_nssd_from_probs, jsd, nssd_values
from .shapley import ANGLE_METHODS, ShapleyResult, preference_angle, shapley

__all__ = [
    # lens
    "SIGNALS", "logit_lens", "signal", "mam", "mam_from_hidden", "MAMComponents", "mam_components",
    "TargetProfile", "mam_by_target",
    # ldar
    "topk_positions", "latent_decision", "LDARResult", "ldar",
    # nssd
    "NSSD_METHODS", "answer_prob", "compliance_prob", "jsd", "nssd_values", "NSSDResult", "i_nssd",
    "i_nssd_from_probs",
    # mfr
    "MATCH_MODES", "MENTIONS", "normalise", "first_line", "AnswerReading", "read_answer", "answer_follows",
    "mention_counts", "MFRResult", "mfr", "mfr_from_pi", "mfr_from_follows",
    # heads
    "HeadScores", "answer_direction", "head_scores", "top_g", "spearman", "topk_overlap",
    # imbalance
    "IMBALANCE_METHODS", "ImbalanceResult", "attention_imbalance",
    # keyspace
    "KERNELS", "subsample", "PCAResult", "pooled_pca", "median_bandwidth", "kernel_matrix", "mmd2_unbiased",
    "MMDResult", "keyspace_mmd", "JSDResult", "keyspace_jsd", "KeySpaceResult", "keyspace_analysis",
    # shapley
    "ANGLE_METHODS", "ShapleyResult", "shapley", "preference_angle",
]

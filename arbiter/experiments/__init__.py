from .attractors import (
    CREMA_D_LABELS,
    AttractorResult,
    PromptRow,
    attraction,
    error_graph,
    label_perturbation,
    label_token_ids,
    offered_sample,
    plot_attractors,
    removal_subsets,
)

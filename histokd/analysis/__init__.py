"""Representation analysis, figures and run reports (More From Less §2.2, §3.3).

- :mod:`histokd.analysis.cka`: linear / RBF minibatch CKA, layer-by-layer CKA
  matrices between Keras models, per-regime summaries (Fig. 2).
- :mod:`histokd.analysis.gradcam`: GradCAM for conv layers and transformer
  stages, overlays and figure grids (Fig. 3, Fig. S5).
- :mod:`histokd.analysis.plots`: training curves, confusion matrices (Fig. S4),
  ROC curves, embedding scatter plots, CKA heat maps.
- :mod:`histokd.analysis.report`: one self-contained HTML page comparing runs.

Example:
    >>> from histokd.analysis import cka_matrix, plot_cka_heatmap
    >>> plot_cka_heatmap(cka_matrix(enc_a, enc_b, ds, layers_a=r"_out$"), "cka.png")
"""

# The functions ``cka.cka`` and ``gradcam.gradcam`` are not re-exported here so
# that ``histokd.analysis.cka`` / ``.gradcam`` keep naming the modules.
from histokd.analysis.cka import (
    MinibatchCKA,
    cka_matrix,
    gram_linear,
    gram_rbf,
    hsic_unbiased,
    minibatch_cka,
    regime_summary,
)
from histokd.analysis.gradcam import gradcam_grid, overlay_heatmap, tokens_to_grid
from histokd.analysis.plots import (
    plot_cka_heatmap,
    plot_cka_regimes,
    plot_confusion_matrix,
    plot_embedding,
    plot_history,
    plot_roc,
)
from histokd.analysis.report import write_report

__all__ = [
    "MinibatchCKA",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic_unbiased",
    "minibatch_cka",
    "regime_summary",
    "gradcam_grid",
    "overlay_heatmap",
    "tokens_to_grid",
    "plot_cka_heatmap",
    "plot_cka_regimes",
    "plot_confusion_matrix",
    "plot_embedding",
    "plot_history",
    "plot_roc",
    "write_report",
]

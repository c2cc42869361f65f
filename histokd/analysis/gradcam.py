"""GradCAM heat maps for any convolutional layer or transformer stage of a Keras classifier.

Selvaraju et al., *Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization* (ICCV 2017), Eq. 1-2: the channel weights are the
spatially averaged gradients of the class score with respect to a layer's
feature maps, ``α_k = mean_ij ∂y^c/∂A^k_ij``, and the map is
``ReLU(Σ_k α_k A^k)``, normalised to [0, 1] and upsampled to the image.

Used in *More From Less* (Farndale et al.), §3.3, Fig. 3 and Fig. S5, to compare
where asymmetrically and symmetrically trained encoders look.

The layer may sit inside nested sub-models (an encoder inside a classifier):
its output is read during an ordinary forward pass (see ``_taps.LayerTaps``),
so no graph has to be rebuilt. Transformer token maps ``[B, N, C]`` are
reshaped to their ``g × g`` grid, dropping a class token when ``N = g² + 1``.

Example:
    >>> maps = gradcam(classifier, images, layer="conv5_block3_out")   # [B, H, W] in [0, 1]
    >>> rgb = overlay_heatmap(images[0], maps[0], alpha=0.4)
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from histokd.analysis import _taps
from histokd.errors import ConfigError, DataError

__all__ = ["gradcam", "overlay_heatmap", "gradcam_grid", "tokens_to_grid"]


def tokens_to_grid(a, grid=None, prefix_tokens=None):
    """Reshape a token map ``[B, N, C]`` to ``[B, h, w, C]``.

    Args:
        a: tensor [B, N, C].
        grid: None | (h, w). The token grid; default: square, inferred from N.
        prefix_tokens: None | int. Leading non-spatial tokens to drop (class /
            distillation tokens); default: 0 if N is a square, 1 if N - 1 is.

    Example:
        >>> tokens_to_grid(np.zeros((2, 197, 8))).shape    # ViT-B/16 at 224 px
        TensorShape([2, 14, 14, 8])
    """
    import tensorflow as tf

    n = int(a.shape[1])
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        drop = n - h * w if prefix_tokens is None else int(prefix_tokens)
    else:
        drop = None
        if prefix_tokens is not None:
            drop = int(prefix_tokens)
        else:
            for d in (0, 1):
                g = math.isqrt(max(n - d, 0))
                if g > 0 and g * g == n - d:
                    drop = d
                    break
        if drop is None:
            raise ConfigError(
                f"cannot arrange {n} tokens on a square grid (with or without a class token); "
                "pass grid=(h, w) and/or prefix_tokens=K"
            )
        g = math.isqrt(n - drop)
        h = w = g
    if drop < 0 or h * w != n - drop:
        raise ConfigError(f"{n} tokens do not fit grid {h}x{w} after dropping {drop} prefix token(s)")
    a = tf.convert_to_tensor(a)
    return tf.reshape(a[:, drop:, :], (-1, h, w, int(a.shape[-1])))


def _model_images(model, images) -> np.ndarray:
    """Images as the model wants them: float32 in [0, 1], except for models whose input is
    integer (histokd's exported classifiers take uint8 and rescale inside), which get the raw
    0..255 values as float32 (cast back to integers by the model's input)."""
    try:
        dtype = str(model.inputs[0].dtype)
    except (AttributeError, IndexError, TypeError, ValueError):
        dtype = "float32"
    if "int" in dtype:
        return np.asarray(images).astype(np.float32)
    return _taps.to_float_images(images)


def _to_map(a, grid, prefix_tokens):
    """Layer output → channels-last spatial map [B, h, w, C]."""
    rank = len(a.shape)
    if rank == 4:
        return a
    if rank == 3:
        return tokens_to_grid(a, grid, prefix_tokens)
    if rank == 5:  # 3-D conv [B, D, H, W, C]: average over depth for a 2-D view
        import tensorflow as tf

        return tf.reduce_mean(a, axis=1)
    raise ConfigError(
        f"GradCAM needs a convolutional map [B, H, W, C] or tokens [B, N, C]; the layer output has shape {tuple(a.shape)}"
    )


def _scores(out, class_index, score):
    import tensorflow as tf

    if isinstance(out, dict) or isinstance(out, (list, tuple)):
        raise ConfigError("GradCAM needs a classifier with one output [B, classes]; this model has several outputs")
    out = tf.convert_to_tensor(out)
    if len(out.shape) != 2:
        raise ConfigError(f"GradCAM needs a classifier output [B, classes], got shape {tuple(out.shape)}")
    if score == "auto":
        o = out.numpy()
        is_prob = o.shape[1] > 1 and np.all(o >= 0) and np.allclose(o.sum(axis=1), 1.0, atol=1e-3)
        score = "log_prob" if is_prob else "output"
    if class_index is None:
        idx = tf.argmax(out, axis=1, output_type=tf.int32)
    else:
        idx = np.broadcast_to(np.asarray(class_index, dtype=np.int32), (out.shape[0],))
        if np.any(idx < 0) or np.any(idx >= out.shape[1]):
            raise ConfigError(f"class_index {class_index} is out of range for {out.shape[1]} classes")
        idx = tf.constant(idx)
    picked = tf.gather(out, idx, axis=1, batch_dims=1)
    if score == "log_prob":
        # A softmax output saturates; the log-probability keeps useful gradients.
        picked = tf.math.log(tf.maximum(picked, 1e-12))
    elif score != "output":
        raise ConfigError(f"score must be 'auto', 'output' or 'log_prob', got {score!r}")
    return picked, idx.numpy()


def gradcam(
    model,
    images,
    layer: str,
    class_index=None,
    *,
    score: str = "auto",
    grid=None,
    prefix_tokens=None,
    upsample: bool = True,
    return_class: bool = False,
):
    """GradCAM maps of one layer of a classifier.

    Args:
        model: keras.Model. Outputs ``[B, classes]`` (logits or probabilities);
            takes float32 images in [0, 1].
        images: array [B, H, W, C] (uint8 images are scaled to [0, 1], unless the model
            itself takes uint8 input like histokd's exported classifiers) or [H, W, C].
        layer: str. Name or path (``"encoder/conv1_conv"``) of the layer, which may
            be nested in sub-models. Conv maps [B, h, w, C] and token maps [B, N, C]
            are supported.
        class_index: None | int | array [B]. Class to explain; None = predicted class.
        score: str. ``"output"`` differentiates the model output, ``"log_prob"`` its
            log (for softmax outputs), ``"auto"`` picks ``log_prob`` when the output
            rows are probabilities.
        grid: None | (h, w). Token grid for transformer layers (default square).
        prefix_tokens: None | int. Non-spatial leading tokens (default 0 or 1).
        upsample: bool. Resize maps to the image size (bilinear).
        return_class: bool. Also return the explained class of each image.

    Returns:
        float32 array [B, H, W] in [0, 1] (or [B, h, w] without upsampling);
        with ``return_class``, ``(maps, classes)``.

    Example:
        >>> maps = gradcam(clf, x, "encoder/conv2_block1_1_conv", class_index=3)
    """
    x = _model_images(model, images)
    single = x.ndim == 3
    if single:
        x = x[None]
    maps, classes = _gradcam_layers(model, x, [layer], class_index, score, grid, prefix_tokens, upsample)
    cam = maps[0]
    if single:
        cam, classes = cam[0], classes[0]
    return (cam, classes) if return_class else cam


def _gradcam_layers(model, x, layers, class_index, score, grid, prefix_tokens, upsample):
    """GradCAM of several layers from one forward and one backward pass."""
    import tensorflow as tf

    if x.ndim != 4:
        raise DataError(f"images must be [B, H, W, C] or [H, W, C], got shape {x.shape}")
    chosen = _taps.select_layers(model, list(layers))
    keyed = [(str(i), layer) for i, (_, layer) in enumerate(chosen)]
    xt = tf.constant(x)
    with _taps.LayerTaps(keyed) as taps:
        with tf.GradientTape() as tape:
            out = model(xt, training=False)
            missing = [layers[int(k)] for k, _ in keyed if k not in taps.outputs]
            if missing:
                raise ConfigError(
                    f"layer(s) {missing} were not used when model {model.name!r} ran; pick layers on the "
                    "path from the input to the class output"
                )
            acts = [taps.outputs[k] for k, _ in keyed]
            picked, classes = _scores(out, class_index, score)
            total = tf.reduce_sum(picked)
        grads = tape.gradient(total, acts)
    maps = []
    for name, a, g in zip(layers, acts, grads):
        if g is None:
            raise ConfigError(f"the class score does not depend on layer {name!r}; pick another layer")
        fmap = _to_map(tf.cast(a, tf.float32), grid, prefix_tokens)
        gmap = _to_map(tf.cast(g, tf.float32), grid, prefix_tokens)
        weights = tf.reduce_mean(gmap, axis=(1, 2), keepdims=True)  # α_k, Eq. 1
        cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy()  # Eq. 2
        peak = cam.reshape(cam.shape[0], -1).max(axis=1)
        cam = cam / np.where(peak > 0, peak, 1.0)[:, None, None]
        if upsample and cam.shape[1:] != x.shape[1:3]:
            cam = tf.image.resize(cam[..., None], x.shape[1:3], method="bilinear").numpy()[..., 0]
            cam = np.clip(cam, 0.0, 1.0)
        maps.append(cam.astype(np.float32))
    return maps, classes


def _display_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.shape[-1] > 3:
        img = img[..., :3]
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:  # not in [0, 1]: stretch for display only
        img = (img - lo) / (hi - lo if hi > lo else 1.0)
    return img


def overlay_heatmap(image, heatmap, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map onto an image.

    Args:
        image: array [H, W, 3] (uint8 or float in [0, 1]) or [H, W].
        heatmap: array [h, w] in [0, 1] (resized to the image when needed).
        alpha: float. Weight of the heat map colour.
        cmap: str. Matplotlib colormap name.

    Returns:
        uint8 array [H, W, 3].

    Example:
        >>> overlay_heatmap(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4))).shape
        (4, 4, 3)
    """
    import matplotlib

    img = _display_rgb(image)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape != img.shape[:2]:
        import tensorflow as tf

        hm = tf.image.resize(hm[..., None], img.shape[:2], method="bilinear").numpy()[..., 0]
    colour = matplotlib.colormaps[cmap](np.clip(hm, 0.0, 1.0))[..., :3]
    out = (1.0 - alpha) * img + alpha * colour
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gradcam_grid(
    models: Mapping[str, object],
    images,
    layers: Sequence[str],
    out_png: str,
    *,
    inputs: Mapping[str, object] | None = None,
    class_index=None,
    extra_columns: Mapping[str, object] | None = None,
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.4,
    cmap: str = "jet",
    show_image: bool = True,
    score: str = "auto",
    grid=None,
    prefix_tokens=None,
    cell_inches: float = 1.8,
    dpi: int = 100,
) -> str:
    """Figure of GradCAM overlays, like More From Less Fig. 3 / Fig. S5.

    Rows are images; columns are the original image (optional), then one column
    per (model, layer), then any extra columns (e.g. the HoVer-Net masks a mask
    model saw).

    Args:
        models: dict name -> keras.Model classifier.
        images: array [B, H, W, 3]. Images shown (and fed to the models unless
            ``inputs`` says otherwise).
        layers: list[str]. Layer names/paths; each is looked up in every model.
        out_png: str. Output path (parent folders are created).
        inputs: dict model name -> array [B, H, W, C]. Model-specific inputs
            (e.g. masks for a mask encoder); overlays are still drawn on ``images``.
        class_index: None | int | array [B]. Class to explain (None = predicted).
        extra_columns: dict title -> array [B, H, W, 3]. Shown as plain images.
        row_labels: list[str]. One label per row (e.g. the true class).
        alpha: float. Heat map weight in the overlay.
        cmap: str. Colormap (jet as in the paper).
        show_image: bool. Put the original image in the first column.
        score, grid, prefix_tokens: see :func:`gradcam` (transformer stages).
        cell_inches: float. Size of one panel.
        dpi: int. Resolution.

    Returns:
        str. ``out_png``.

    Example:
        >>> gradcam_grid({"asymmetric": clf_a, "symmetric": clf_s}, masks[:4],
        ...              ["conv1_conv"], "plots/gradcam.png", extra_columns={"image": tiles[:4]})
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not models:
        raise ConfigError("gradcam_grid needs at least one model")
    if isinstance(layers, str):
        layers = [layers]
    imgs = np.asarray(images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    n = imgs.shape[0]
    inputs = dict(inputs or {})
    extra = {k: np.asarray(v) for k, v in (extra_columns or {}).items()}
    for k, v in list(inputs.items()) + list(extra.items()):
        if len(v) != n:
            raise DataError(f"{k!r} has {len(v)} images but {n} images were given")

    columns = []  # (title, [n] panels)
    if show_image:
        columns.append(("image", [_display_rgb(im) for im in imgs]))
    for mname, model in models.items():
        x = _model_images(model, inputs.get(mname, imgs))
        all_maps, classes = _gradcam_layers(model, x, list(layers), class_index, score, grid, prefix_tokens, True)
        for layer, maps in zip(layers, all_maps):
            panels = [overlay_heatmap(imgs[i], maps[i], alpha, cmap) for i in range(n)]
            title = mname if len(layers) == 1 else (layer if len(models) == 1 else f"{mname}\n{layer}")
            columns.append((title, panels, classes))
    for title, arr in extra.items():
        columns.append((title, [_display_rgb(im) for im in arr]))

    ncol = len(columns)
    fig = Figure(figsize=(cell_inches * ncol, cell_inches * n + 0.5), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, ncol, squeeze=False)
    for c, col in enumerate(columns):
        title, panels = col[0], col[1]
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(panels[r])
            ax.set_xticks([])
            ax.set_yticks([])
            if len(col) == 3:
                ax.text(0.02, 0.98, f"c={int(col[2][r])}", transform=ax.transAxes, fontsize=7,
                        va="top", ha="left", color="white",
                        bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png

"""Write the walkthrough notebooks from this script, so they are reviewed as code.

    python scripts/make_notebooks.py            # (re)writes notebooks/*.ipynb, outputs cleared
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from this script

Each notebook starts with a cell ``SMOKE = True`` tagged ``parameters`` (papermill
style); the environment variable ``HISTOKD_SMOKE=1``/``0`` overrides it, which is
how CI runs them in smoke mode (tiny data, one epoch). Every file a notebook
writes goes to a fresh ``tempfile.mkdtemp()`` folder; in smoke mode it is deleted
at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "notebooks"


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text, tags=None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


PARAMETERS = code("""
# Smoke mode: tiny data (32 px tiles, 48 images), one epoch, a quarter-width ResNet-18 —
# what CI runs. Set SMOKE = False for the real demo (a few minutes on 2 CPU cores).
SMOKE = True
""", tags=["parameters"])


def setup(prefix):
    return code(f'''
import os

# HISTOKD_SMOKE=1 (or 0) overrides the parameter above; CI sets it.
if os.environ.get("HISTOKD_SMOKE", "").strip():
    SMOKE = os.environ["HISTOKD_SMOKE"].strip().lower() in ("1", "true", "yes", "on")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import logging
import warnings
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import Image, display

import histokd

logging.getLogger("tensorflow").setLevel(logging.ERROR)  # no retracing chatter
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

# Everything this notebook writes goes under WORKDIR, a fresh temporary folder.
WORKDIR = Path(tempfile.mkdtemp(prefix="{prefix}"))

# Smoke settings (applied on top of the packaged `default` config; no augmentation, to
# keep the graphs small). Without them the `default` config runs: 64 px synthetic H&E
# tiles, 4 classes, 8 epochs, ResNet-18 × 0.5, Table S1 augmentations.
SETTINGS = [
    "data.image_size=32", "data.synthetic_per_class=16", "data.synthetic_classes=3",
    "model.backbone_kwargs={{width: 0.25, small_input: true}}", "model.expander_dims=[32,32,32]",
    "views.augment=false", "data.val_fraction=0.1", "train.epochs=1", "train.batch_size=8",
    "eval.probe_epochs=5",
    "eval.embedding_plot=false",
] if SMOKE else []
PROBE_EPOCHS = 5 if SMOKE else 100
print(f"histokd {{histokd.__version__}} | smoke mode: {{SMOKE}} | working folder: {{WORKDIR}}")
''')


CLEANUP = code("""
# Smoke runs leave nothing behind; a real run keeps its folder for you to explore.
if SMOKE:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    print("removed", WORKDIR)
else:
    print("results are in", WORKDIR)
""")


# --------------------------------------------------------------------------- 00 quickstart
def quickstart():
    cells = [
        md("""
# histokd quickstart: install → demo run → predict → export

histokd trains self-supervised and knowledge-distillation models for histopathology with
Keras 3. This notebook trains the built-in demo — *More From Less*'s asymmetric VICReg on
synthetic H&E tiles — then classifies image files with the exported model and reloads it
the way a deployment would.
"""),
        PARAMETERS,
        md("""
## 1. Install

From a clone of the repository (Python ≥ 3.11):

```bash
python -m venv .venv && . .venv/bin/activate
pip install -e ".[notebooks]"
```

The next cell only checks that the package imports.
"""),
        setup("histokd_quickstart_"),
        code("""
from histokd.config import list_configs

configs = list_configs()
print(f"{len(configs)} packaged configs, e.g.:")
for name in configs[:6]:
    print("  ", name)
"""),
        md("""
## 2. Demo run

`histokd train` on the command line is `histokd.train.run` in Python: it trains, runs the
linear evaluation of both encoders (the sparse one on downsampled tiles, the dense one on
full tiles) and exports everything into a run directory. The shell equivalent is

```bash
histokd train --config default --set output_dir=runs
```
"""),
        code("""
from histokd.config import load_config
from histokd.train import results_table, run

cfg = load_config("default", [f"output_dir={WORKDIR / 'runs'}", "name=demo",
                              "train.verbose=0" if SMOKE else "train.verbose=2"] + SETTINGS)
print(cfg.description)
results = run(cfg, progress=not SMOKE)
RUN_DIR = WORKDIR / "runs" / "demo"
print(results_table(results))
"""),
        code("""
# the run directory: config, history, metrics, plots and the exported models
for p in sorted(RUN_DIR.rglob("*")):
    if p.is_file() and "checkpoints" not in p.parts and "logs" not in p.parts:
        print(p.relative_to(RUN_DIR))
display(Image(str(RUN_DIR / "plots" / "training_curves.png")))
"""),
        md("""
## 3. Predict

`histokd predict MODEL IMAGES... --out preds.csv` classifies image files (PNG/JPEG/TIFF,
any size: they are resized to the model's input). Here we write a few test tiles as PNG
files and classify them with the run's export folder (its first classifier, the one that
reads downsampled tiles).
"""),
        code("""
import cv2

from histokd.cli import main as histokd_cli
from histokd.data.datasets import build_data

source = build_data(cfg)
x_test, y_test = source.arrays("test")
tiles = WORKDIR / "tiles"
tiles.mkdir()
for i in range(6):
    cv2.imwrite(str(tiles / f"{i:02d}_{source.class_names[y_test[i]]}.png"), x_test[i][..., ::-1])

histokd_cli(["--quiet", "predict", str(RUN_DIR / "export"), str(tiles), "--out", str(WORKDIR / "preds.csv")])
preds = pd.read_csv(WORKDIR / "preds.csv")   # one row per image: prediction, confidence, p_<class>
print("columns:", list(preds.columns))
"""),
        code("""
# The same in Python: an exported classifier takes uint8 RGB tiles and does all of its
# preprocessing itself (scaling, downsampling for the sparse branch, stain normalisation).
from histokd.export import load_classifier

clf, meta = load_classifier(RUN_DIR / "export" / "classifier_b.keras")
probs = clf.predict(x_test, verbose=0)
print("classes:", meta["class_names"])
print(f"accuracy of the full-resolution classifier on {len(y_test)} test tiles: "
      f"{(probs.argmax(1) == y_test).mean():.3f}")
"""),
        md("""
## 4. Export

Every run already exported its encoders (`encoder_<branch>.keras`), its classifiers
(`classifier_<branch>.keras`) and `metadata.json`. `histokd export RUN_DIR [--saved-model]`
re-exports a run, optionally with TF SavedModels for TF Serving. Reloading needs nothing but
`import histokd` (which registers histokd's layers with Keras).
"""),
        code("""
import keras

meta = json.loads((RUN_DIR / "export" / "metadata.json").read_text())
print(json.dumps({k: meta[k] for k in ("class_names", "input_size", "downsample", "classifiers")}, indent=1))

# plain Keras reload; the same probabilities as `histokd predict` gave for the PNG files above
reloaded = keras.saving.load_model(RUN_DIR / "export" / "classifier_a.keras")
p_cli = preds[[f"p_{c}" for c in meta["class_names"]]].to_numpy()
assert np.allclose(reloaded.predict(x_test[:6], verbose=0), p_cli, atol=1e-5)
print("classifier_a reloads with identical outputs")

if not SMOKE:  # a SavedModel for serving (takes a little while)
    reloaded.export(str(WORKDIR / "saved_model_a"), verbose=False)
    print("SavedModel written to", WORKDIR / "saved_model_a")
"""),
        CLEANUP,
    ]
    return cells


# --------------------------------------------------------------------------- 01 More From Less
def more_from_less():
    cells = [
        md("""
# *More From Less*, walked through

Farndale, Insall, Yuan — *More From Less: Self-Supervised Knowledge Distillation for
Information-Sparse Histopathology Data*. Two branches of a joint-embedding model see two
versions of the same tile: an **information-sparse** one (downsampled, or a nuclear-type
mask) and an **information-dense** one (the original). Training on such *asymmetric* pairs
distils knowledge into the sparse encoder, which later needs only sparse inputs.

1. Data and stain normalisation (§2.3)
2. Downsampling pairs (§2.1)
3. Asymmetric vs symmetric VICReg (§2.1–2.2, Table 1)
4. Linear evaluation (§2.2)
5. Supervised baseline (§2.2)
6. CKA between layers (§3.3, Fig. 2)
7. GradCAM (§3.3, Fig. 3 and S5)
8. Image ↔ mask pairs and the transfer protocol (§2.1, §3.2, Table 2)

Everything runs on histokd's built-in synthetic H&E tiles. The paper-scale experiments are
packaged configs (`histokd configs`), e.g. `more_from_less/table1_asymmetric_7px` with
`--set data.path=NCT-CRC-HE-100K --set data.test_path=CRC-VAL-HE-7K`.
"""),
        PARAMETERS,
        setup("histokd_more_from_less_"),
        code("""
R = 8            # side of the information-sparse view in pixels (the paper goes down to 7 of 224)
RUNS = WORKDIR / "runs"
"""),
        md("""
## 1. Data and stain normalisation

The paper uses the Kather colorectal dataset (NCT-CRC-HE-100K for training, CRC-VAL-HE-7K
for testing, 9 tissue classes), all tiles Macenko-normalised. The demo data are procedural
H&E tiles rendered with a Beer–Lambert model; their classes differ in nuclear density, size
and texture, and in the stroma around them.
"""),
        code("""
from histokd.data.synthetic import make_synthetic_he

demo, demo_y, demo_names = make_synthetic_he(n_per_class=2, image_size=96, seed=1, num_classes=6)
order = np.argsort(demo_y, kind="stable")
fig, axes = plt.subplots(2, 6, figsize=(12, 4.6))
for ax, i in zip(axes.T.ravel(), order):
    ax.imshow(demo[i]); ax.set_title(demo_names[demo_y[i]], fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        code("""
# Macenko stain normalisation (histokd.stain), as every tile in the paper.
try:
    from histokd.stain import MacenkoNormalizer
except ImportError as err:
    MacenkoNormalizer = None
    print(f"stain normalisation is not available in this installation ({err}); skipping this step")

if MacenkoNormalizer is not None:
    normalizer = MacenkoNormalizer(target="torchstain")
    normalized, passed = normalizer.transform(demo[order], return_passthrough=True)
    normalized, passed = np.asarray(normalized), np.asarray(passed)
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.4))
    for k in range(6):
        axes[0, k].imshow(demo[order][2 * k]); axes[1, k].imshow(normalized[2 * k])
        axes[0, k].axis("off"); axes[1, k].axis("off")
    axes[0, 0].set_title("original", loc="left"); axes[1, 0].set_title("Macenko-normalised", loc="left")
    plt.tight_layout(); plt.show()
    print(f"{int(passed.sum())} of {len(passed)} tiles passed through unchanged (too little tissue to fit)")
"""),
        md("""
## 2. Downsampling pairs

"In the symmetric case, both images are downsampled to 7×7 px, while in the asymmetric case,
only the first branch is downsampled […]. The downsampled images are always resized to
224×224 px using linear interpolation" (§2.1). `histokd.data.views.Downsample` is that step
(antialiased down, bilinear back up); it also sits inside exported sparse-branch classifiers.
"""),
        code("""
from histokd.data.views import Downsample, make_view_maker

tile, _, _ = make_synthetic_he(n_per_class=1, image_size=224, seed=2, num_classes=1)
sizes = [224, 112, 56, 28, 14, 7]
x = tile.astype("float32") / 255.0
fig, axes = plt.subplots(1, len(sizes), figsize=(13, 2.6))
for ax, r in zip(axes, sizes):
    ax.imshow(np.clip(Downsample(r)(x).numpy()[0], 0, 1))
    ax.set_title(f"{r} px ({0.5 * 224 / r:g} mpp)", fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()

# the view makers build the training pairs, with the Table S1 augmentations per view
pairs = {kind: make_view_maker(kind, 224, downsample=7, augment=True, seed=0)(tile)
         for kind in ("asymmetric", "symmetric")}
fig, axes = plt.subplots(1, 4, figsize=(9, 2.6))
for ax, (kind, view) in zip(axes, [(k, v) for k in pairs for v in ("view_a", "view_b")]):
    ax.imshow(np.clip(np.asarray(pairs[kind][view])[0], 0, 1)); ax.set_title(f"{kind}: {view}", fontsize=9)
    ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        md("""
## 3. Asymmetric vs symmetric VICReg

Two runs of the same model — ResNet encoders with a 3-layer expander, VICReg loss
(λ = 25, μ = 25, ν = 1), Adam with warm-up cosine — that differ only in their pairs:
*asymmetric* (sparse ↔ dense) and *symmetric* (sparse ↔ sparse). In the shell:

```bash
histokd train --config default --set name=asymmetric --set views.downsample=8
histokd train --config default --set name=symmetric --set views.kind=symmetric --set views.downsample=8
```
"""),
        code("""
from histokd.config import load_config
from histokd.train import results_table, run


def train(name, *overrides):
    cfg = load_config("default", [f"name={name}", f"output_dir={RUNS}", f"views.downsample={R}",
                                  "train.verbose=0"] + SETTINGS + list(overrides))
    results = run(cfg, progress=False)
    print(f"== {name}: views {cfg.views.kind}, method {cfg.model.method}, "
          f"{results['train']['steps']} steps in {results['train']['seconds']} s")
    print(results_table(results), end="\\n\\n")
    return cfg, results


cfg_asym, res_asym = train("asymmetric")
cfg_sym, res_sym = train("symmetric", "views.kind=symmetric")
display(Image(str(RUNS / "asymmetric" / "plots" / "training_curves.png")))
"""),
        md("""
## 4. Linear evaluation

"With the encoder's weights frozen, we assess model performance by training a classifier
(dense layer with softmax) for 100 epochs using an Adam optimiser and learning rate of
10⁻³" (§2.2). Each run did this for both of its encoders, the sparse one (branch `a`) on
downsampled tiles and the dense one (branch `b`) on full tiles. The features are cached in
the run directory, so other probes (e.g. fewer labels) cost seconds.
"""),
        code("""
def accuracy(results, branch):
    for label, per in results["evaluation"].items():
        if label.split(" ")[0] == branch:
            return per[max(per, key=float)]["accuracy"]
    return float("nan")


table = pd.DataFrame({
    "asymmetric": [accuracy(res_asym, "a"), accuracy(res_asym, "b")],
    "symmetric": [accuracy(res_sym, "a"), accuracy(res_sym, "b")],
}, index=[f"sparse encoder ({R} px tiles)", "dense encoder (full tiles)"])
table.round(3)
"""),
        code("""
from histokd.evaluation import classification_metrics, linear_probe, stratified_subset

# a probe on half of the training labels, from the sparse encoder's cached features
feats = np.load(RUNS / "asymmetric" / "features_a_downsampled.npz")
idx = stratified_subset(feats["train_y"], 0.5, seed=0)
head, _ = linear_probe(feats["train_x"][idx], feats["train_y"][idx], num_classes=cfg_asym.data.synthetic_classes,
                       epochs=PROBE_EPOCHS, lr=1e-3)
m = classification_metrics(feats["test_y"], head.predict(feats["test_x"], verbose=0))
print(f"50 % labels: accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}")

# Fig. S4-style confusion matrix of the sparse encoder's probe
display(Image(str(sorted((RUNS / "asymmetric" / "plots").glob("confusion_a*.png"))[0])))
"""),
        md("""
## 5. Supervised baseline

"We produce supervised baseline comparisons using an equivalent encoder and softmax
classifier head, following the same training protocol" — trained end to end on the same
downsampled tiles (`model.method=supervised`, `views.kind=identity`).
"""),
        code("""
cfg_sup, res_sup = train("supervised", "model.method=supervised", "views.kind=identity")
table["supervised"] = [accuracy(res_sup, "image"), float("nan")]
table.round(3)   # one row of Table 1: asymmetric vs symmetric vs supervised at R px
"""),
        md("""
## 6. CKA between layers

Centered kernel alignment compares what two networks compute, layer by layer (Kornblith et
al. 2019), here estimated over the test set in minibatches with the unbiased HSIC estimator.
The paper finds that models trained under the same regime become very similar, while
asymmetric and symmetric models differ, more so in deeper layers (Fig. 2). Below: the sparse
encoders of the two runs, each reading the downsampled test tiles, at every ResNet block
output. Both runs start from the same initial weights (`train.seed`), so CKA starts at 1 and
falls where training under the two regimes pulls the layers apart (in smoke mode, three
steps, it stays close to 1). From the shell: `histokd analyze cka runs/asymmetric runs/symmetric --layers "_out$"`;
for Fig. 2b's per-regime averages over several seeds see `histokd.analysis.regime_summary`.
"""),
        code("""
from histokd.analysis import cka_matrix, plot_cka_heatmap
from histokd.data.views import downsample_batch
from histokd.evaluation.transfer import load_run_encoders
from histokd.data.datasets import build_data, eval_dataset

source = build_data(cfg_asym)
test_ds = eval_dataset(cfg_asym, source, "test", batch_size=32)
sparse = {name: load_run_encoders(RUNS / name)["a"].encoder for name in ("asymmetric", "symmetric")}


def downsampled(batch):  # what a sparse encoder reads: tiles at R px, resized back, in [0, 1]
    return downsample_batch(batch[0], R).numpy()


cka = cka_matrix(sparse["asymmetric"], sparse["symmetric"], test_ds, layers_a=r"_out$",
                 input_key=downsampled, progress=False)
print("CKA of corresponding layers:", np.round(np.diag(cka.to_numpy()), 2))
display(Image(plot_cka_heatmap(cka, WORKDIR / "cka_asym_vs_sym.png",
                               title=f"sparse encoders, asymmetric vs symmetric ({R} px)")))
"""),
        md("""
## 7. GradCAM

Where do the sparse classifiers look? GradCAM (Selvaraju et al. 2017) weights a layer's
feature maps by the spatially averaged gradients of the class score. Fig. S5 shows the first
convolution of each ResNet block; the exported classifiers take uint8 tiles and downsample
them themselves.
"""),
        code("""
from histokd.analysis import gradcam_grid
from histokd.export import load_classifier

classifiers = {name: load_classifier(RUNS / name / "export" / "classifier_a.keras")[0]
               for name in ("asymmetric", "symmetric")}
x_test, y_test = source.arrays("test")
tiles = x_test[:4]
layers = ["conv1_conv", "conv2_block1_1_conv", "conv3_block1_1_conv", "conv4_block1_1_conv", "conv5_block1_1_conv"]
seen = np.round(downsample_batch(tiles, R).numpy() * 255).astype("uint8")
png = gradcam_grid(classifiers, tiles, layers, WORKDIR / "gradcam.png",
                   extra_columns={f"{R} px input": seen},
                   row_labels=[source.class_names[y] for y in y_test[:4]])
display(Image(png))
"""),
        md("""
## 8. Image ↔ mask pairs and Table 2's transfer protocol

In the tissue–nuclei experiment the sparse input is a nuclear-type mask from HoVer-Net
(the type id of each pixel repeated to 3 channels), paired with its tile. `histokd masks SRC
DST --weights HOVERNET.tar` builds such a paired dataset; without the (CC BY-NC-SA) weights,
`--method classical` segments nuclei without types.
"""),
        code("""
try:
    from histokd.nuclei import colour_mask, most_present_type, nucleus_counts, segment_classical, type_mask
except (ImportError, AttributeError) as err:
    segment_classical = None
    print(f"nuclear masks are not available in this installation ({err}); skipping the pairs")

if segment_classical is not None:
    picks = [int(np.flatnonzero(demo_y == k)[0]) for k in range(4)]
    fig, axes = plt.subplots(2, 4, figsize=(9, 4.6))
    for k, i in enumerate(picks):
        res = segment_classical(demo[i], mpp=112.0 / demo.shape[1])   # the demo tiles cover 112 µm
        tmap = res.type_map()
        counts = nucleus_counts(res, 2)
        paper_mask = type_mask(tmap)                       # what the mask branch reads
        assert paper_mask.shape == demo[i].shape
        axes[0, k].imshow(demo[i]); axes[0, k].set_title(demo_names[demo_y[i]], fontsize=9)
        axes[1, k].imshow(colour_mask(tmap)); axes[1, k].set_title(
            f"{int(counts.sum())} nuclei, label {most_present_type(counts)}", fontsize=9)
        axes[0, k].axis("off"); axes[1, k].axis("off")
    plt.tight_layout(); plt.show()
"""),
        md("""
Table 2 freezes every encoder and trains a new softmax head on each of two tasks over the same
tiles: tissue type, and "nucleus counting" (the most-present nucleus type). With HoVer-Net mask
datasets, `histokd.evaluation.transfer.mask_pair_tasks(train_dir, test_dir)` gives both tasks
(and the masks for mask encoders). Here, without HoVer-Net, the second task is a stand-in that
also depends on the nuclei: the tercile of each tile's haematoxylin content. The supervised
tissue encoder is the baseline whose own task is the first column.
"""),
        code("""
from skimage.color import rgb2hed

from histokd.evaluation.transfer import TransferTask, table2


def haematoxylin(x):
    return np.array([rgb2hed(t)[..., 0].mean() for t in x])


x_train, _ = source.arrays("train")
edges = np.quantile(haematoxylin(x_train), [1 / 3, 2 / 3])
tercile = {"train": np.digitize(haematoxylin(x_train), edges), "test": np.digitize(haematoxylin(x_test), edges)}
tasks = {"tissue type": TransferTask(source),
         "haematoxylin tercile": TransferTask(source, labels=tercile, class_names=["low", "mid", "high"])}
encoders = {"VICReg asymmetric": (RUNS / "asymmetric", "a"), "VICReg symmetric": (RUNS / "symmetric", "a"),
            "supervised tissue": RUNS / "supervised"}
transfer = table2(encoders, tasks, epochs=PROBE_EPOCHS, progress=False)
transfer.round(3)
"""),
        CLEANUP,
    ]
    return cells



# --------------------------------------------------------------------------- 02 Swin V2 + MoBY + distillation
def swinv2_moby_distillation():
    cells = [
        md("""
# Swin V2, MoBY pre-training and layer-wise distillation, walked through

Meng Li — *Transformer-Based Self-Supervised Learning and Distillation for Medical Image
Classification*. The paper's pipeline, on small synthetic H&E data:

1. **Swin Transformer V2** backbones (Liu et al. 2022): scaled cosine attention, log-spaced
   continuous relative position bias, residual post-norm (§II).
2. **Multi-scale augmentation**: random resized crops mixed with 2× magnified crops (§III-A).
3. **MoBY** self-supervised pre-training (Xie et al. 2021): online encoder + projector +
   predictor, a momentum target and two key queues (§III-A).
4. **Fine-tuning** a bigger Swin V2 (the teacher) on labels: batch 32, lr 1e-3 (§IV-A).
5. **Progressive layer-wise distillation** into a smaller Swin V2 (the student), three stages
   with α = 0.2, 0.15, 0.1 plus KL on softened logits and α·CE on labels (§III-B, Eq. 1–2),
   compared with the same student fine-tuned without a teacher.

The packaged paper-scale configs are `swinv2/moby_swinv2_{tiny,base}`,
`swinv2/finetune_swinv2_{tiny,small,base}`, `swinv2/distill_swinv2_base_to_tiny[_learnable]`
and the Table II baselines `swinv2/baseline_*`; this notebook runs the same configs with
small models.
"""),
        PARAMETERS,
        setup("histokd_swinv2_"),
        code("""
# Small Swin V2s so that everything runs on a laptop CPU: same architecture, fewer/narrower
# blocks. The "teacher" is wider than the "student", as Swin-B is wider than Swin-T.
SIZE = 32 if SMOKE else 64
DATA = [f"data.image_size={SIZE}", "data.source=synthetic", "data.path=null", "data.test_path=null",
        "data.synthetic_classes=3" if SMOKE else "data.synthetic_classes=4",
        "data.synthetic_per_class=16" if SMOKE else "data.synthetic_per_class=96",
        "data.val_fraction=0.1", "data.test_fraction=0.25", f"output_dir={WORKDIR / 'runs'}",
        "train.verbose=0", "train.checkpoint_every=0", f"eval.probe_epochs={PROBE_EPOCHS}",
        "eval.embedding_plot=false", "train.batch_size=8" if SMOKE else "train.batch_size=32",
        "train.epochs=1" if SMOKE else "train.epochs=10"]
STUDENT = "model.backbone_kwargs={embed_dim: 16, depths: [1, 1, 1], num_heads: [1, 2, 4], window_size: 4}"
TEACHER = ("model.backbone_kwargs={embed_dim: 32, depths: [1, 1, 1], num_heads: [2, 4, 8], window_size: 4}"
           if SMOKE else
           "model.backbone_kwargs={embed_dim: 48, depths: [2, 2, 2], num_heads: [2, 4, 8], window_size: 4}")
if not SMOKE:
    STUDENT = "model.backbone_kwargs={embed_dim: 24, depths: [1, 1, 1], num_heads: [1, 2, 4], window_size: 4}"
"""),
        md("""
## 1. Swin V2 backbones

`histokd.backbones.make_backbone("swinv2_tiny", 256)` builds the paper's Swin V2-T (window 8
at 256 px; window 7 at 224 px). Every backbone returns pooled features and lists its stage
outputs in `stage_names` — the taps that layer-wise distillation, CKA and GradCAM read. The
test suite checks our outputs against Hugging Face `Swinv2Model` with the same weights, and
`histokd.backbones.load_pretrained` reads Hugging Face / timm checkpoints without PyTorch.
"""),
        code("""
import keras
from histokd.backbones import make_backbone

full = make_backbone("swinv2_tiny", 256)
print(f"swinv2_tiny at 256 px: {full.count_params() / 1e6:.1f} M parameters, "
      f"window {full.window_size}, features {full.output_dim}")
print("stages:", full.stage_names)
del full
"""),
        md("""
## 2. Multi-scale views

Each view is, with probability ½, a **2× magnified** crop — half the field of view per side,
resized to the input size, i.e. the same tissue at twice the magnification — and otherwise a
random resized crop (20–100 % of the area). Tumours and glands thus appear at several scales.
"""),
        code("""
from histokd.config import load_config
from histokd.data.datasets import build_data
from histokd.data.multiscale import multiscale_crop

cfg = load_config("swinv2/moby_swinv2_tiny", DATA)
source = build_data(cfg)
x, _ = source.arrays("train")
tiles = x[:4]
crops, (boxes, magnified) = multiscale_crop(tiles, size=SIZE, seed=3, return_boxes=True)
fig, axes = plt.subplots(2, 4, figsize=(8, 4.3))
for i in range(4):
    axes[0, i].imshow(tiles[i]); axes[0, i].set_title("tile", fontsize=9)
    axes[1, i].imshow(crops[i].numpy())
    axes[1, i].set_title("2x magnified" if bool(magnified[i]) else "random crop", fontsize=9)
for a in axes.ravel():
    a.axis("off")
plt.tight_layout(); plt.show()
"""),
        md("""
## 3. MoBY pre-training

`model.method: moby` with `views.kind: multiscale`. Logged per epoch: the contrastive loss,
the positive-key accuracy and the momentum, which rises from 0.99 towards 1 over the run.
The online encoder is exported as `export/encoder_online.keras` and evaluated by a linear
probe, like every self-supervised run.
"""),
        code("""
from histokd.train import results_table, run

MOBY = ["moby.hidden_dim=64", "moby.out_dim=32", "moby.queue_size=64", "train.lr=1e-3",
        "train.warmup_epochs=0"]
moby = run(load_config("swinv2/moby_swinv2_tiny", DATA + MOBY + [STUDENT]), progress=not SMOKE)
MOBY_DIR = WORKDIR / "runs" / "moby_swinv2_tiny"
print(results_table(moby))
print(pd.read_csv(MOBY_DIR / "history.csv")[["epoch", "loss", "accuracy", "momentum"]].round(4))
"""),
        md("""
## 4. Fine-tuning: the teacher, and the student without distillation

The teacher is the bigger model fine-tuned on labels (the paper fine-tunes the MoBY-pre-trained
Swin-B; here the teacher trains from scratch to keep the notebook short). The student
baseline is the small model fine-tuned from its MoBY weights (`model.weights` names the
pre-trained encoder file) — what distillation has to beat.
"""),
        code("""
teacher = run(load_config("swinv2/finetune_swinv2_base", DATA + [TEACHER, "model.weights=null"]),
              progress=not SMOKE)
TEACHER_DIR = WORKDIR / "runs" / "finetune_swinv2_base"
ENCODER = MOBY_DIR / "export" / "encoder_online.keras"
plain = run(load_config("swinv2/finetune_swinv2_tiny", DATA + [STUDENT, f"model.weights={ENCODER}"]),
            progress=not SMOKE)
print("teacher\\n" + results_table(teacher))
print("student, fine-tuned without a teacher\\n" + results_table(plain))
"""),
        md("""
## 5. Progressive layer-wise distillation

`model.method: distill` with `distill.teacher` naming the teacher's run directory. The loss
(Eq. 1–2) is Σᵢ αᵢ · MSE(Pᵢ(student stage i), teacher stage i) + τ² · KL(softmax(z_T/τ) ‖
softmax(z_S/τ)) + α · CE(y, z_S), over the three deepest stages with α = 0.2, 0.15, 0.1;
Pᵢ is a learned projection where the widths differ. With `schedule: progressive` the
deepest stage is distilled from the start and shallower ones are switched on in turn.
The teacher's weights never change.
"""),
        code("""
distilled = run(load_config("swinv2/distill_swinv2_base_to_tiny",
                            DATA + [STUDENT, f"model.weights={ENCODER}", f"distill.teacher={TEACHER_DIR}",
                                    "distill.stage_interval_epochs=0.34"]), progress=not SMOKE)
DISTIL_DIR = WORKDIR / "runs" / "distill_swinv2_base_to_tiny"
print(pd.read_csv(DISTIL_DIR / "history.csv")[["epoch", "loss", "kd", "ce", "feature", "accuracy"]].round(4))


def accuracy(results):
    per = next(iter(results["evaluation"].values()))
    return per[max(per, key=float)]["accuracy"]


summary = pd.DataFrame({
    "model": ["teacher (wide Swin V2)", "student, fine-tuned", "student, distilled"],
    "test accuracy": [accuracy(teacher), accuracy(plain), accuracy(distilled)],
})
print(summary.round(4).to_string(index=False))
"""),
        md("""
The paper also lets each αᵢ be learned ("performance is similar"):
`distill.learnable_alphas: true` keeps every αᵢ inside a range around its start value through a
sigmoid parameterisation. The distilled student is exported like any classifier; it takes
uint8 tiles and needs only `import histokd` to reload.
"""),
        code("""
from histokd.train import load_trained_model

if not SMOKE:
    run(load_config("swinv2/distill_swinv2_base_to_tiny_learnable",
                    DATA + [STUDENT, f"model.weights={ENCODER}", f"distill.teacher={TEACHER_DIR}"]),
        progress=True)
    learned, _ = load_trained_model(WORKDIR / "runs" / "distill_swinv2_base_to_tiny_learnable")
    print("learned alphas:", np.round(keras.ops.convert_to_numpy(learned.alphas()), 4))

from histokd.export import load_classifier

student, meta = load_classifier(DISTIL_DIR / "export")
x_test, y_test = source.arrays("test")
print(f"exported student: {student.count_params():,} parameters, accuracy "
      f"{(student.predict(x_test, verbose=0).argmax(1) == y_test).mean():.3f} on {len(y_test)} test tiles")
"""),
        CLEANUP,
    ]
    return cells


NOTEBOOKS = {
    "00_quickstart.ipynb": quickstart,
    "01_more_from_less.ipynb": more_from_less,
    "02_swinv2_moby_distillation.ipynb": swinv2_moby_distillation,
}


def build(fn) -> nbformat.NotebookNode:
    nb = new_notebook(cells=fn())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    # stable cell ids keep regenerated notebooks byte-identical
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if a notebook differs from this script")
    args = ap.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, fn in NOTEBOOKS.items():
        text = nbformat.writes(build(fn)) + "\n"
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print("wrote", path.relative_to(REPO))
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

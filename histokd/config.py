"""Run configuration: a dataclass schema, YAML loading, ``--set`` overrides, validation.

A run is described by one YAML file whose shared sections map onto the
dataclasses below (``data``, ``views``, ``augment``, ``model``, ``train``,
``eval``, ``export``, and ``task``); each method contributes its own section
(its ``Config`` dataclass: ``loss`` for VICReg/SimCLR, ``moby``, ``distill``),
found through the method registry. Unknown or mistyped keys are rejected with the list of
valid keys, values are type-checked, and ``--set a.b=c`` overrides are parsed
as YAML scalars (``--set train.epochs=3``, ``--set model.expander_dims=[64,64]``).

Packaged configs live in ``histokd/configs/`` (one folder per paper plus
``default.yaml``) and are addressed by name, e.g. ``more_from_less/table1_asym_r7``.

Example:
    >>> from histokd.config import load_config
    >>> cfg = load_config("default", overrides=["train.epochs=1"])
    >>> cfg.train.epochs
    1
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from histokd.data.augment_config import AugmentConfig  # noqa: F401  (the augment section; TF-free)
from histokd.errors import ConfigError
from histokd.registry import SOURCES, VIEWS
from histokd.runtime import parse_cpu_threads  # noqa: F401  (train.cpu_threads is checked here)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class StainConfig:
    """Stain normalisation applied to every batch before view making.

    Args:
        method: str. ``none`` or ``macenko`` (More From Less §2.3: "All patches are
            colour-normalised using the Macenko method").
        target: str. ``torchstain`` (torchstain's default reference) or a path to a target image.
        on_failure: str. ``passthrough`` (return the tile unchanged and count it) or ``error``.
    """

    method: str = "none"
    target: str = "torchstain"
    on_failure: str = "passthrough"


@dataclass
class DataConfig:
    """Where images come from and how they are split.

    Args:
        source: str. ``synthetic`` (built-in H&E demo), ``folder`` (class per folder),
            ``manifest`` (CSV), ``medmnist`` (.npz), ``tfrecord`` (made by ``histokd data prepare``),
            ``mask_pairs`` (made by ``histokd masks``).
        path: str. Path of the source (unused for ``synthetic``).
        test_path: str. Optional second source used entirely as the test split
            (e.g. CRC-VAL-HE-7K beside NCT-CRC-HE-100K, as in More From Less §2.3).
        image_size: int or list. Working size in pixels (224 in the paper): an int for square
            tiles, ``[H, W]`` (square only, for now) or ``[D, H, W]`` for a 3-D backbone; the
            rank must be the backbone's.
        val_fraction, test_fraction: float. Stratified, seeded split fractions for sources without splits.
        seed: int. Seed of the split and of shuffling.
        synthetic_per_class, synthetic_classes: int. Size of the synthetic demo set.
        on_bad_image: str. ``error`` or ``skip`` (skips are counted and reported).
        cache: bool. Cache decoded images in memory (small datasets).
        stain: StainConfig. Stain normalisation.
        label: str. ``mask_pairs`` only: the task (More From Less §2.2, Table 2) — ``tissue``
            (the tissue class, i.e. the images' class folder) or ``nucleus_type`` ("nucleus
            counting": the most-present nuclear type, ``Background`` only without nuclei).
        input: str. ``mask_pairs`` only: what the batches hold. ``image`` (default): the pair
            ``{"image", "mask"}`` — views ``mask`` (image↔mask) and the image kinds read what
            they need, a supervised run reads the images. ``mask``: the masks only (``{"mask"}``;
            the H&E PNGs are not decoded) — for a supervised run on masks (``views.kind:
            identity``, geometric augmentation only) or ``views.kind: mask_symmetric``. Masks are
            never stain-normalised, so ``mask`` needs ``data.stain.method: none``.
    """

    source: str = "synthetic"
    path: Optional[str] = None
    test_path: Optional[str] = None
    image_size: Any = 64
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    synthetic_per_class: int = 96
    synthetic_classes: int = 4
    on_bad_image: str = "error"
    cache: bool = True
    stain: StainConfig = field(default_factory=StainConfig)
    label: str = "tissue"
    input: str = "image"


@dataclass
class ViewsConfig:
    """How a batch becomes the two views of a joint-embedding model.

    Args:
        kind: str. ``asymmetric`` (view_a downsampled, view_b original; More From Less §2.1),
            ``symmetric`` (both downsampled), ``identity`` (supervised: one view), ``mask``
            (view_a = nuclear-type mask, view_b = image; Table 2 "asymmetric"), ``mask_symmetric``
            (two independently augmented views of the mask; Table 2 "symmetric"). The mask kinds
            need ``data.source: mask_pairs`` and ``views.downsample: null``.
        downsample: int. Side in pixels the sparse view is downsampled to before being
            resized back to ``data.image_size`` (Table 1: 224/112/56/28/14/7). ``null``: none.
        augment: bool. Apply the Table S1 augmentations.
        augment_on: str. ``host`` (in tf.data) or ``device`` (inside the training step).
        magnify_prob, magnification, crop_scale: kind ``multiscale`` (MoBY pre-training in the
            Swin V2 paper, §III-A: "random cropping and 2x magnification"): each view is, with
            probability ``magnify_prob``, a crop of 1/``magnification`` of the field of view
            resized to the input size, otherwise a random resized crop of ``crop_scale`` of the area.
    """

    kind: str = "asymmetric"
    downsample: Optional[int] = 7
    augment: bool = True
    augment_on: str = "host"
    magnify_prob: float = 0.5
    magnification: float = 2.0
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class ModelConfig:
    """The method and its networks.

    Args:
        method: str. ``vicreg``, ``simclr`` (joint embedding), ``supervised``, ``moby``
            (MoBY pre-training, see ``moby``) or ``distill`` (teacher → student, see ``distill``).
        backbone: str. Encoder of branch a (registry name: resnet50, mobilenet_v2,
            efficientnet_b0, xception, resnet18, ...).
        backbone_b: str. Encoder of branch b when it differs from branch a (CASS-style); null = same kind.
        backbone_kwargs: dict. Extra arguments of the encoder factory (e.g. ``width`` for resnet18).
        weights: str. Optional local weights file for the encoder(s).
        shared: bool. One encoder + expander for both branches (Table S3 "shared weights").
        expander_dims: list. Widths of the expander's dense layers (paper: 3×8192).
    """

    method: str = "vicreg"
    backbone: str = "resnet18"
    backbone_b: Optional[str] = None
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    shared: bool = False
    expander_dims: List[int] = field(default_factory=lambda: [8192, 8192, 8192])


@dataclass
class TrainConfig:
    """Optimisation (More From Less §2.2: Adam, warm-up cosine, lr 1e-4, batch 128, 100 epochs).

    Args:
        epochs: int. Training epochs.
        batch_size: int. Global batch size (split over replicas).
        lr: float. Peak learning rate after warm-up.
        warmup_epochs: float. Length of the linear warm-up in epochs (paper: 1/10).
        weight_decay: float. AdamW-style decoupled weight decay (0: plain Adam as the paper).
        steps_per_epoch: int. Optional cap on steps per epoch (smoke runs).
        strategy: str. ``auto``, ``one_device``, ``mirrored`` or ``multi_worker``.
        mixed_precision: str. Optional Keras dtype policy, e.g. ``mixed_bfloat16``.
        jit_compile: bool. XLA; slower on CPU, so off by default.
        cpu_threads: str. TensorFlow's CPU thread pools: ``auto`` (without GPUs, a
            two-view method runs each view's encoder on its own half of the cores:
            intra-op = cores // 2, inter-op = 2), ``default`` (TensorFlow's) or
            ``"INTRA,INTER"``. See :func:`histokd.train.cpu_thread_plan`.
        checkpoint_every: int. Steps between resumable backups (0: every epoch).
        collapse_threshold: float. Normalised embedding std below which a run is collapsed.
        seed: int. Global seed.
        verbose: int. Keras progress-bar verbosity (0, 1, 2).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    warmup_epochs: float = 0.1
    weight_decay: float = 0.0
    steps_per_epoch: Optional[int] = None
    strategy: str = "auto"
    mixed_precision: Optional[str] = None
    jit_compile: bool = False
    cpu_threads: str = "auto"
    checkpoint_every: int = 0
    collapse_threshold: float = 0.02
    seed: int = 0
    verbose: int = 1


@dataclass
class EvalConfig:
    """Linear evaluation (More From Less §2.2: frozen encoder, softmax dense layer,
    100 epochs, Adam 1e-3).

    Args:
        probe_epochs: int. Epochs of the linear probe.
        probe_lr: float. Learning rate of the probe.
        probe_batch_size: int. Batch size of the probe.
        label_fractions: list. Fractions of the training labels used (stratified, seeded).
        embedding_plot: bool. Write a t-SNE/PCA scatter of test features.
    """

    probe_epochs: int = 100
    probe_lr: float = 1e-3
    probe_batch_size: int = 256
    label_fractions: List[float] = field(default_factory=lambda: [1.0])
    embedding_plot: bool = True


@dataclass
class ExportConfig:
    """What a run exports.

    Args:
        saved_model: bool. Also write a TF SavedModel (``model.export``) for serving.
    """

    saved_model: bool = False


@dataclass
class RunConfig:
    """A whole run. See the module docstring.

    Besides the shared sections below, a run holds the sections of its method (e.g.
    ``loss`` for VICReg/SimCLR, ``moby``, ``distill``): each is the method's own ``Config``
    dataclass, read as ``cfg.<section>`` and kept in :attr:`sections`.

    Args:
        task: str. How the run is evaluated and what it exports (a registered task:
            ``classification``).
    """

    name: str = "default"
    description: str = ""
    paper: str = ""
    output_dir: str = "runs"
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sections: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name):
        # only reached when normal look-up fails: a method's section
        if name.startswith("__"):
            raise AttributeError(name)
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        section_cls = method_sections().get(name)
        if section_cls is not None:
            return section_cls()  # a section the config does not set: its defaults
        raise AttributeError(f"RunConfig has no section {name!r}")

    def to_dict(self) -> dict:
        d = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
             else getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        for name, section in self.sections.items():
            d[name] = dataclasses.asdict(section)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """A short hash of everything that affects the trained weights."""
        d = self.to_dict()
        for k in ("name", "description", "output_dir"):
            d.pop(k, None)
        d["train"].pop("verbose", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def method_sections() -> Dict[str, type]:
    """``{section name: Config dataclass}`` of every registered method that has a section.

    Raises:
        ConfigError: two methods declare the same section with different dataclasses.
    """
    from histokd.registry import METHODS

    out = {}
    for name, cls in METHODS.items():
        section = getattr(cls, "config_section", None)
        if not section:
            continue
        if section in out and out[section] is not cls.Config:
            raise ConfigError(f"methods declare YAML section {section!r} with different fields "
                              f"({out[section].__name__} and {cls.Config.__name__}, method {name!r})")
        out[section] = cls.Config
    return out


class _RegisteredNames:
    """The names of a registry minus some, looked up when validation first needs them
    (the look-up imports the registering modules, which need TensorFlow)."""

    def __init__(self, registry, exclude=()):
        self.registry, self.exclude = registry, tuple(exclude)

    def _names(self):
        return [n for n in self.registry.names() if n not in self.exclude]

    def __contains__(self, name):
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __repr__(self):
        return repr(self._names())


CHOICES = {
    # sources and view kinds are registry entries; "auto" (path sniffing) and "eval" (feature
    # extraction) are registered for the library but are not choices of a run
    "data.source": _RegisteredNames(SOURCES, exclude=("auto",)),
    "data.on_bad_image": ["error", "skip"],
    "data.stain.on_failure": ["passthrough", "error"],
    "data.label": ["tissue", "nucleus_type"],
    "data.input": ["image", "mask"],
    "views.kind": _RegisteredNames(VIEWS, exclude=("eval",)),
    "views.augment_on": ["host", "device"],
    "train.strategy": ["auto", "one_device", "mirrored", "multi_worker"],
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotated type ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of keys {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, List):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "sections"]
    extra = method_sections() if cls is RunConfig else {}
    kwargs, sections = {}, {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key in extra:
            sections[key] = _coerce(value, extra[key], path)
            continue
        if key not in names:
            valid = names + sorted(extra)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}.{hint} Valid keys{' of ' + where if where else ''}: {', '.join(valid)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    if sections:
        kwargs["sections"] = sections
    return cls(**kwargs)


def _validate_image_size(cfg: RunConfig):
    """``data.image_size``: an int (square tiles) or a list of 2 (H, W) / 3 (D, H, W) sides,
    whose rank must be the backbone's; a square [S, S] becomes S."""
    from histokd.backbones._common import backbone_spatial_rank

    size = cfg.data.image_size
    sides = [size] if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(sides, (list, tuple)) or len(sides) not in (1, 2, 3)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides)
            or (len(sides) == 1 and not isinstance(size, int))):
        raise ConfigError(f"data.image_size must be an integer (square tiles), [H, W] or [D, H, W], got {size!r}")
    if min(sides) < 8:
        raise ConfigError(f"data.image_size must be >= 8, got {size!r}")
    rank = 2 if len(sides) <= 2 else 3
    backbone_rank = backbone_spatial_rank(cfg.model.backbone)
    if rank != backbone_rank:
        raise ConfigError(f"data.image_size={size!r} is a {rank}-D size but model.backbone={cfg.model.backbone} "
                          f"reads {backbone_rank}-D inputs; give {'[D, H, W]' if backbone_rank == 3 else 'an int'} "
                          "or choose a backbone of that rank")
    if rank == 2 and len(sides) == 2:
        if sides[0] != sides[1]:
            raise ConfigError(f"data.image_size={size!r}: the 2-D pipelines work on square tiles (every image "
                              "is resized to S x S); give one side, e.g. data.image_size="
                              f"{max(sides)}")
        cfg.data.image_size = int(sides[0])


def _check_choices(cfg: RunConfig):
    from histokd.registry import METHODS, TASKS

    from histokd.stain import STAIN_NORMALIZERS

    choices = dict(CHOICES, **{"model.method": METHODS.names(), "task": TASKS.names(),
                               "data.stain.method": sorted(STAIN_NORMALIZERS)})
    for name, section in cfg.sections.items():
        for key, allowed in getattr(type(section), "CHOICES", {}).items():
            choices[f"{name}.{key}"] = allowed
    for path, allowed in choices.items():
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            raise ConfigError(f"{path} must be one of {allowed}, got {obj!r}")


def _validate_method(cfg: RunConfig):
    """What every method needs of a run (its section, the batches its view kind yields,
    device-side views), then the method's own checks (``Method.validate_run_config``)."""
    from histokd.registry import METHODS, VIEWS

    name = cfg.model.method
    method = METHODS.get(name)
    section = getattr(method, "config_section", None)
    if section and section not in cfg.sections:
        cfg.sections[section] = method.Config()
    kind = cfg.views.kind
    view = VIEWS.get(kind)
    outputs = view.outputs
    needs = tuple(method.batch_inputs)
    if not set(needs) <= set(outputs):
        if needs == ("image",):
            raise ConfigError(f"model.method={name} needs views.kind=identity (set views.downsample "
                              "to train on downsampled images)")
        fitting = [k for k in VIEWS.names() if k != "eval"
                   and set(needs) <= set(VIEWS.get(k).outputs)]
        raise ConfigError(f"model.method={name} needs batches with {list(needs)}, which views.kind={kind} "
                          f"does not make; use views.kind {', '.join(fitting) or 'with two views'}")
    if cfg.views.augment_on == "device" and not method.supports_device_augment:
        supported = [k for k in METHODS.names() if METHODS.get(k).supports_device_augment]
        raise ConfigError(f"views.augment_on=device is not supported by model.method={name} (only by "
                          f"{', '.join(supported)}); use views.augment_on=host")
    method.validate_run_config(cfg)


def _validate(cfg: RunConfig):
    _check_choices(cfg)
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 2:
        raise ConfigError("train.epochs must be >= 1 and train.batch_size >= 2 (batch-statistic losses need 2+ samples)")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    parse_cpu_threads(t.cpu_threads)
    _validate_image_size(cfg)
    if cfg.views.downsample is not None and cfg.views.downsample < 1:
        raise ConfigError(f"views.downsample must be a positive size in pixels or null, got {cfg.views.downsample}")
    _validate_method(cfg)
    VIEWS.get(cfg.views.kind).validate(cfg)
    SOURCES.get(cfg.data.source).validate(cfg)
    for f in cfg.eval.label_fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"eval.label_fractions must be in (0, 1], got {f}")


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at top level, got {type(data).__name__}")
    cfg = _build(RunConfig, data, "")
    _validate(cfg)
    return cfg


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r} ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML)."""
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def list_configs() -> List[str]:
    """Names of the packaged configs (``histokd configs``)."""
    return sorted(
        str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    if p.exists():
        return p
    names = list_configs()
    close = difflib.get_close_matches(name_or_path, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"no config {name_or_path!r}: not a file and not a packaged config.{hint} "
        f"Run `histokd configs` to list the {len(names)} packaged configs."
    )


def load_yaml(path: Path) -> dict:
    """Read a YAML config, following ``base:`` (a packaged name or a relative path)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    base = data.pop("base", None)
    if base:
        base_path = Path(path).parent / base
        if not base_path.exists():
            base_path = resolve_config_path(base)
        merged = load_yaml(base_path)
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(name_or_path: str = "default", overrides=None) -> RunConfig:
    """Load a packaged or user config, apply ``--set`` overrides, validate.

    Args:
        name_or_path: str. A packaged config name (see :func:`list_configs`) or a YAML path.
        overrides: list of str. ``section.key=value`` items.
    """
    path = resolve_config_path(name_or_path)
    data = load_yaml(path)
    data = apply_overrides(data, overrides)
    return config_from_dict(data)

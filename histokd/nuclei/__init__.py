"""Nuclear segmentation for tissue/nuclei distillation (More From Less §2.1).

HoVer-Net in Keras with official-checkpoint loading (no PyTorch needed), its
post-processing, tiled inference, a weight-free classical segmenter, the
type-coloured masks the paper pairs with images, and HoVer-Net training targets.

Names are imported lazily, so ``histokd.nuclei.checkpoint`` (numpy only) and the
post-processing can be used without loading Keras/TensorFlow.
"""

import importlib

_EXPORTS = {
    "hovernet": ("HoVerNet", "GroupedConv2D", "predict_maps", "fuse_batchnorm", "with_input_size",
                 "PANNUKE_TYPE_NAMES", "PANNUKE_PALETTE"),
    "checkpoint": ("load_official_checkpoint", "read_state_dict", "read_torch_file",
                   "official_key_table", "detect_hovernet_config", "load_state_dict_into",
                   "convert_checkpoint_to_npz"),
    "postprocess": ("postprocess", "instances_from_maps", "instance_info", "scale_constants",
                    "NucleiResult", "Nucleus"),
    "tiling": ("predict_tiled", "predict_tiled_many", "segment_nuclei", "segment_many"),
    "classical": ("segment_classical", "CLASSICAL_TYPE_NAMES"),
    "masks": ("build_mask_dataset", "masks_command", "mask_dataset", "parse_mask_example",
              "type_mask", "colour_mask", "most_present_type", "nucleus_counts"),
    "targets": ("make_targets", "hv_map"),
    "metrics": ("aggregated_jaccard_index", "dice"),
    "synthetic": ("synthetic_he_tile",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"histokd.nuclei.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'histokd.nuclei' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

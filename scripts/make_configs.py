"""Regenerate the packaged More From Less configs (histokd/configs/more_from_less/).

Run: python scripts/make_configs.py. Each file is small and readable; this script only
saves typing the 45 rows of Tables 1, 2, S2 and S3 by hand.
"""

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "histokd" / "configs" / "more_from_less"
PAPER = "More From Less (Farndale, Insall, Yuan)"


def write(name, description, body, header=""):
    text = (f"# {PAPER}: {description}\n{header}base: _base.yaml\nname: mfl_{name}\n"
            f"description: \"{description}\"\n{body}")
    (OUT / f"{name}.yaml").write_text(text)


# Table 2 (tissue-nuclei distillation, §2.1-2.3) reads image/mask pairs made by `histokd masks`
TABLE2_HEADER = """\
# Data: image/nuclear-type mask pairs of NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test),
# made once with HoVer-Net (PanNuke types; official weights, CC BY-NC-SA 4.0, not bundled):
#   histokd data fetch nct_crc_he_100k data/nct_crc_he_100k
#   histokd data fetch crc_val_he_7k data/crc_val_he_7k
#   histokd masks data/nct_crc_he_100k/NCT-CRC-HE-100K data/nct_crc_he_100k/masks --weights hovernet_fast_pannuke_type_tf2pytorch.tar --mpp 0.5
#   histokd masks data/crc_val_he_7k/CRC-VAL-HE-7K data/crc_val_he_7k/masks --weights hovernet_fast_pannuke_type_tf2pytorch.tar --mpp 0.5
# (or point data.path / data.test_path elsewhere with --set).
"""
TABLE2_TASKS = {"tissue": ("tissue", "tissue types"), "nuclei": ("nucleus_type", "nucleus counting")}


def table2_data(task, input_="image", stain=True):
    body = ("data:\n  source: mask_pairs\n  path: data/nct_crc_he_100k/masks\n"
            "  test_path: data/crc_val_he_7k/masks\n"
            f"  label: {TABLE2_TASKS[task][0]}\n  input: {input_}\n")
    if not stain:  # masks are never stain-normalised; mask-only runs decode no H&E image
        body += "  stain:\n    method: none\n"
    return body


def views(kind, r):
    if kind == "supervised":
        return f"views:\n  kind: identity\n  downsample: {r}\nmodel:\n  method: supervised\n"
    return f"views:\n  kind: {kind}\n  downsample: {r}\n"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for r, mpp in [(224, 0.5), (112, 1), (56, 2), (28, 4), (14, 8), (7, 16)]:
        for kind in ("asymmetric", "symmetric", "supervised"):
            desc = f"Table 1, {r}x{r}px ({mpp} mpp), {kind}"
            write(f"table1_{kind}_{r}px", desc, views(kind, r))
    for enc in ("mobilenet_v2", "efficientnet_b0", "xception"):
        for kind in ("asymmetric", "symmetric", "supervised"):
            desc = f"Table S2, {enc} encoder, 7x7px, {kind}"
            body = views(kind, 7)
            body += ("  " if "model:" in body else "model:\n  ") + f"backbone: {enc}\n"
            write(f"tableS2_{enc}_{kind}", desc, body)
    for method in ("simclr", "vicreg"):
        for shared in (True, False):
            if method == "vicreg" and not shared:
                continue  # = table1_*_7px (the paper's default: VICReg, independent weights)
            for kind in ("asymmetric", "symmetric"):
                w = "shared" if shared else "independent"
                desc = f"Table S3, {method} ({w} weights), 7x7px, {kind}"
                body = views(kind, 7) + f"model:\n  method: {method}\n  shared: {str(shared).lower()}\n"
                write(f"tableS3_{method}_{w}_{kind}", desc, body)
    for task, (_, task_desc) in TABLE2_TASKS.items():
        for method in ("vicreg", "simclr"):
            for kind, view in (("asymmetric", "mask"), ("symmetric", "mask_symmetric")):
                pair = "image<->mask" if kind == "asymmetric" else "mask<->mask"
                desc = f"Table 2, {method} {kind} ({pair}), {task_desc} task"
                # mask<->mask never reads the H&E image: masks only, no stain normalisation
                body = table2_data(task, "mask" if kind == "symmetric" else "image", stain=kind == "asymmetric")
                body += f"views:\n  kind: {view}\n  downsample: null\nmodel:\n  method: {method}\n"
                write(f"table2_{method}_{kind}_{task}", desc, body, TABLE2_HEADER)
        for inp in ("images", "masks"):
            desc = f"Table 2, supervised on {inp}, {task_desc} task"
            body = table2_data(task, inp[:-1], stain=inp == "images")
            body += "views:\n  kind: identity\n  downsample: null\nmodel:\n  method: supervised\n"
            write(f"table2_supervised_{inp}_{task}", desc, body, TABLE2_HEADER)


if __name__ == "__main__":
    main()

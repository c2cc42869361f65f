"""Regenerate the packaged More From Less configs (histokd/configs/more_from_less/).

Run: python scripts/make_configs.py. Each file is small and readable; this script only
saves typing the 33 rows of Tables 1, S2 and S3 by hand.
"""

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "histokd" / "configs" / "more_from_less"
PAPER = "More From Less (Farndale, Insall, Yuan)"


def write(name, description, body):
    text = f"# {PAPER}: {description}\nbase: _base.yaml\nname: mfl_{name}\ndescription: \"{description}\"\n{body}"
    (OUT / f"{name}.yaml").write_text(text)


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


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Aggregated Jaccard index and Dice of the weight-free classical nucleus segmenter.

On synthetic H&E tiles with known nuclei (``histokd.nuclei.synthetic``; 256×256,
30 partly touching nuclei each, ≈ 0.25 µm/px sizes) and, when ../shared/data is
present, nucleus counts per class on the 100 real Kather-2016 tiles (no ground
truth there: a sanity check that nucleus-rich classes get more nuclei).

Usage::

    python scripts/eval_classical_nuclei.py --tiles 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=20)
    args = ap.parse_args(argv)

    from histokd.nuclei.classical import segment_classical
    from histokd.nuclei.metrics import aggregated_jaccard_index, dice
    from histokd.nuclei.synthetic import synthetic_he_tile

    aji, dsc, n_true, n_pred = [], [], [], []
    for seed in range(args.tiles):
        img, inst = synthetic_he_tile(seed)
        res = segment_classical(img)
        aji.append(aggregated_jaccard_index(inst, res.inst_map))
        dsc.append(dice(inst, res.inst_map))
        n_true.append(int(inst.max()))
        n_pred.append(len(res.nuclei))
    print(f"synthetic H&E, {args.tiles} tiles: AJI {np.mean(aji):.3f} ± {np.std(aji):.3f} "
          f"(min {np.min(aji):.3f}), Dice {np.mean(dsc):.3f} ± {np.std(dsc):.3f}, "
          f"nuclei {np.sum(n_pred)} found / {np.sum(n_true)} true")

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kather2016_ishil100"
    if root.is_dir():
        import cv2

        print("Kather-2016 sample (224 px ≈ 0.33 µm/px after the 150→224 upsampling): nuclei per tile")
        for cls in sorted(p for p in root.iterdir() if p.is_dir()):
            counts = []
            for f in sorted(cls.glob("*.png")):
                img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
                counts.append(len(segment_classical(img, mpp=0.495 * 150 / 224).nuclei))
            print(f"  {cls.name:<11} median {np.median(counts):5.1f}  (n={len(counts)})")


if __name__ == "__main__":
    main()

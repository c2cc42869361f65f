"""Synthetic H&E tiles by Beer-Lambert from known stain vectors (test helper)."""

import numpy as np

# torchstain's reference stains (columns of HERef): a realistic H&E pair 22 degrees apart.
H_TRUE = np.array([0.5626, 0.7201, 0.4062])
E_TRUE = np.array([0.2159, 0.8012, 0.5581])


PAIRS_FOR_PARITY = [
    (H_TRUE, E_TRUE),
    ((0.65, 0.70, 0.29), (0.25, 0.85, 0.45)),
    ((0.60, 0.70, 0.40), (0.30, 0.75, 0.60)),
]


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def concentrations(size=96, seed=0, nuclei=12):
    """H and E concentration maps: E-only stroma, H-rich nuclei, mixtures, background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    e = 0.8 + 1.0 * (0.5 + 0.5 * np.sin(xx / (5 + 5 * rng.random()))
                     * np.cos(yy / (7 + 5 * rng.random())))
    e = np.clip(e + 0.05 * rng.standard_normal((size, size)), 0.05, None)
    h = np.zeros((size, size))
    for _ in range(nuclei):
        cy, cx = rng.random(2) * size
        r = size * (0.04 + 0.05 * rng.random())
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2
        h += (1.0 + 0.6 * rng.random()) * np.exp(-d2)
    core = h > 0.8
    e = np.where(core, 0.0, e * np.exp(-h))  # nuclei cores are pure haematoxylin
    # a background corner (glass)
    bg = (xx + yy) < size * 0.25
    h[bg] = 0.0
    e[bg] = 0.0
    return h, e


def beer_lambert(h, e, h_vec=H_TRUE, e_vec=E_TRUE, io=240.0, noise=1.0, seed=0):
    """uint8 RGB with OD = h * H + e * E (unit vectors) and Gaussian sensor noise."""
    rng = np.random.default_rng(seed + 1000)
    od = h[..., None] * unit(h_vec) + e[..., None] * unit(e_vec)
    img = io * np.exp(-od) - 1.0
    img = img + noise * rng.standard_normal(img.shape)
    img[(h == 0) & (e == 0)] = 250.0 + 3 * rng.random(((h == 0) & (e == 0)).sum())[:, None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synth_he(size=96, seed=0, h_vec=H_TRUE, e_vec=E_TRUE, noise=1.0):
    h, e = concentrations(size, seed)
    return beer_lambert(h, e, h_vec, e_vec, noise=noise, seed=seed)


def angle_deg(a, b):
    a, b = unit(a), unit(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))

"""Procedural H&E-like tissue tiles: the embedded demo dataset.

The generator draws per-pixel haematoxylin (H) and eosin (E) concentration maps
for a few tissue types and turns them into RGB with the Beer–Lambert
optical-density model used by stain-separation methods (Ruifrok & Johnston 2001;
Macenko et al. 2009):

    I_c = Io_c * exp(-(C_H * h_c + C_E * e_c))      c in {R, G, B}

where ``h`` and ``e`` are unit optical-density vectors of the two stains. The
classes mimic the Kather colorectal tissue types used by "More From Less"
(Farndale, Insall & Yuan, §2.3): they differ in nuclear density, size, shape and
chromatin texture, and in the colour and texture of the extra-nuclear tissue.

Every tile covers the same field of view (about 112 µm, i.e. a 224 px Kather tile
at 0.5 µm/px), so ``image_size`` changes the resolution, not the content: a 64 px
tile is a downsampled 224 px tile, which is what multi-magnification distillation
needs. Everything is vectorised numpy (nuclei are splatted as small stamps with
``np.bincount``; smooth textures come from FFT-filtered noise) and fully
determined by the seed. Class ``k`` only depends on ``(seed, k)``, so the first
four classes are identical whether 4 or 6 classes are requested.

Example:
    >>> from histokd.data.synthetic import make_synthetic_he
    >>> x, y, names = make_synthetic_he(n_per_class=8, image_size=64, seed=0)
    >>> x.shape, x.dtype, names
    ((32, 64, 64, 3), dtype('uint8'), ['tumour', 'stroma', 'lymphocytes', 'adipose'])
"""

from __future__ import annotations

import cv2
import numpy as np

from histokd.errors import DataError

#: Tissue types in the order they are added as ``num_classes`` grows.
CLASS_NAMES = ["tumour", "stroma", "lymphocytes", "adipose", "mucus", "debris"]

#: Field of view of one tile in micrometres (224 px at 0.5 µm/px, as in Kather 2018).
FIELD_OF_VIEW_UM = 112.0

#: Reference optical-density vectors (rows: haematoxylin, eosin) before normalisation.
HE_STAIN_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], dtype=np.float64)

_CHUNK = 32  # images rendered together; bounds the memory of stamps and FFTs


# --------------------------------------------------------------------------- helpers
def _noise_fields(rng, n, size, sigma_px, anisotropy=None, angle=None):
    """Smooth zero-mean, unit-std random fields ``[n, size, size]`` (float32).

    White noise low-pass filtered in the Fourier domain by a Gaussian of standard
    deviation ``sigma_px``; with ``anisotropy`` > 1 the field is stretched by that
    factor along ``angle`` (radians, per image), which gives fibre-like streaks.
    Very smooth isotropic fields are made at a lower resolution and upsampled
    (bicubic), which is indistinguishable and much cheaper.
    """
    factor = 1
    if anisotropy is None:
        factor = int(max(1, min(sigma_px / 2.5, size / 16)))
    small = -(-size // factor)
    white = rng.standard_normal((n, small, small), dtype=np.float32)
    spec = np.fft.rfft2(white)
    fy = np.fft.fftfreq(small)[:, None]
    fx = np.fft.rfftfreq(small)[None, :]
    sig = float(sigma_px) / factor
    if anisotropy is None:
        r2 = (fx**2 + fy**2)[None] * sig**2
    else:
        ang = np.asarray(angle, dtype=np.float64).reshape(-1, 1, 1)
        an = np.asarray(anisotropy, dtype=np.float64).reshape(-1, 1, 1)
        along = fx[None] * np.cos(ang) + fy[None] * np.sin(ang)
        across = -fx[None] * np.sin(ang) + fy[None] * np.cos(ang)
        r2 = sig**2 * ((along * an) ** 2 + (across / np.sqrt(an)) ** 2)
    out = np.fft.irfft2(spec * np.exp(-2.0 * np.pi**2 * r2).astype(np.float32), s=(small, small))
    out = out.astype(np.float32)
    if factor > 1:
        out = np.stack([cv2.resize(o, (small * factor, small * factor), interpolation=cv2.INTER_CUBIC)
                        for o in out])[:, :size, :size]
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-6
    return out


def _blur(maps, sigma_px):
    """Gaussian blur of each ``[S, S]`` map of a stack (reflected edges)."""
    if sigma_px <= 0.05:
        return maps
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT) for m in maps])


def _sample_points(rng, density, counts):
    """Sample ``counts[i]`` points per image from a per-pixel ``density`` (rejection).

    Returns ``(img, y, x)`` float arrays (sub-pixel positions). Fewer points than
    asked are returned where the density is too sparse to fill the quota.
    """
    n, size, _ = density.shape
    dmax = density.reshape(n, -1).max(axis=1) + 1e-9
    cand = int(max(counts.max(), 1) * 6 / max(float(density.mean() / dmax.mean()), 0.05))
    cand = min(cand, 20000)
    ys = rng.random((n, cand)) * size
    xs = rng.random((n, cand)) * size
    iy = np.minimum(ys.astype(np.int64), size - 1)
    ix = np.minimum(xs.astype(np.int64), size - 1)
    p = density[np.arange(n)[:, None], iy, ix] / dmax[:, None]
    keep = rng.random((n, cand)) < p
    rank = np.cumsum(keep, axis=1)
    keep &= rank <= counts[:, None]
    img = np.broadcast_to(np.arange(n)[:, None], keep.shape)[keep]
    return img, ys[keep], xs[keep]


def _clustered_points(rng, n, size, counts, n_clusters, spread_px):
    """Points gathered around a few random centres per image (fragment clusters)."""
    total = int(counts.sum())
    img = np.repeat(np.arange(n), counts)
    centre = rng.integers(0, n_clusters, size=total)
    cy = rng.random((n, n_clusters)) * size
    cx = rng.random((n, n_clusters)) * size
    ys = cy[img, centre] + rng.standard_normal(total) * spread_px
    xs = cx[img, centre] + rng.standard_normal(total) * spread_px
    return img, ys, xs


def _stamp(n, size, img, ys, xs, a, b, theta, rng, *, intensity, irregular=0.0,
           texture=0.0, vesicular=0.0, nucleolus=0.0):
    """Splat soft elliptical nuclei into per-image maps.

    Args:
        n, size: number and side of the output maps.
        img, ys, xs: image index and centre (pixels) of each nucleus.
        a, b, theta: semi-axes (pixels) and orientation (radians) of each nucleus.
        intensity: per-nucleus peak haematoxylin concentration.
        irregular: per-nucleus amplitude of the 2nd/3rd harmonic of the outline
            (pleomorphism).
        texture: per-nucleus amplitude of granular chromatin.
        vesicular: per-nucleus amount of rim darkening / pale centre.
        nucleolus: per-nucleus amplitude of a dark central dot.

    Returns:
        ``(conc, mask)`` float32 ``[n, size, size]``: summed stain concentration and
        nuclear coverage (0..1, for displacing cytoplasm).
    """
    m = len(img)
    if m == 0:
        z = np.zeros((n, size, size), np.float32)
        return z, z.copy()
    bcast = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float32), (m,)).copy()  # noqa: E731
    intensity, irregular, texture = bcast(intensity), bcast(irregular), bcast(texture)
    vesicular, nucleolus = bcast(vesicular), bcast(nucleolus)
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    p2, p3 = rng.random((2, m)).astype(np.float32) * 2 * np.pi
    e2, e3 = (rng.random((2, m)).astype(np.float32) * 0.5 + 0.5) * irregular
    # harmonic coefficients: r(phi) = 1 + e2 cos(2 phi + p2) + e3 cos(3 phi + p3)
    c2, s2 = e2 * np.cos(p2), -e2 * np.sin(p2)
    c3, s3 = e3 * np.cos(p3), -e3 * np.sin(p3)
    no_y, no_x = (rng.random((2, m)).astype(np.float32) - 0.5) * 0.6
    # each nucleus gets a stamp just big enough for it; nuclei of equal stamp size are
    # processed together in small passes (cache-sized temporaries)
    halves = np.ceil(a * (1.0 + e2 + e3) + 1.5).astype(np.int64)
    hmax = int(halves.max())
    pad = 2 * hmax + 1
    big = size + 2 * pad  # canvas padded so that no stamp index needs a bounds check
    keep = (ys > -hmax) & (ys < size + hmax) & (xs > -hmax) & (xs < size + hmax)
    conc = np.zeros(n * big * big, dtype=np.float32)
    cover = np.zeros(n * big * big, dtype=np.float32)
    has_irr = bool(np.any(irregular > 0))
    has_tex = bool(np.any(texture > 0))
    has_ves = bool(np.any(vesicular > 0))
    has_nuc = bool(np.any(nucleolus > 0))
    for half in np.unique(halves[keep]):
        k = 2 * int(half) + 1
        off = np.arange(-half, half + 1, dtype=np.float32)
        offi = np.arange(-half, half + 1, dtype=np.int64)
        idx_all = np.flatnonzero(keep & (halves == half))
        step = max(1, 300_000 // (k * k))
        for s in range(0, len(idx_all), step):
            sl = idx_all[s:s + step]
            col = lambda v: v[sl, None, None]  # noqa: E731
            q = len(sl)
            iy0 = np.floor(ys[sl]).astype(np.int64)
            ix0 = np.floor(xs[sl]).astype(np.int64)
            dy = (iy0 - ys[sl]).astype(np.float32)[:, None, None] + off[None, :, None]
            dx = (ix0 - xs[sl]).astype(np.float32)[:, None, None] + off[None, None, :]
            ct = np.cos(theta[sl]).astype(np.float32)[:, None, None]
            st = np.sin(theta[sl]).astype(np.float32)[:, None, None]
            un = (dx * ct + dy * st) / col(a)
            vn = (dy * ct - dx * st) / col(b)
            d = np.sqrt(un * un + vn * vn)
            if has_irr:
                inv = 1.0 / (d + 1e-6)
                cs, sn = un * inv, vn * inv
                cos2, sin2 = cs * cs - sn * sn, 2 * cs * sn
                cos3, sin3 = cs * (4 * cs * cs - 3), sn * (3 - 4 * sn * sn)
                d /= 1.0 + col(c2) * cos2 + col(s2) * sin2 + col(c3) * cos3 + col(s3) * sin3
            # anti-aliased edge about one pixel wide
            edge = np.clip((1.0 - d) * (0.5 * (col(a) + col(b))) + 0.5, 0.0, 1.0)
            prof = edge * col(intensity)
            if has_ves:
                inner = np.minimum(d, 1.0)
                ves = col(vesicular)
                prof *= (1.0 - ves) + ves * (0.35 + 0.65 * inner * inner)
            if has_tex:
                grain = rng.random((q, k, k), dtype=np.float32) - 0.5
                prof *= np.maximum(1.0 + col(texture) * 3.4 * grain, 0.0)
            if has_nuc:
                nd2 = ((un - col(no_x)) ** 2 + (vn - col(no_y)) ** 2) * 25.0
                prof += edge * col(nucleolus) * col(intensity) * np.exp(-nd2)
            base = (img[sl].astype(np.int64) * big + iy0 + pad) * big + ix0 + pad
            flat = (base[:, None, None] + offi[None, :, None] * big + offi[None, None, :]).ravel()
            np.add.at(conc, flat, prof.ravel())
            np.add.at(cover, flat, edge.ravel())
    crop = (slice(None), slice(pad, pad + size), slice(pad, pad + size))
    conc = np.ascontiguousarray(conc.reshape(n, big, big)[crop])
    cover = np.minimum(cover.reshape(n, big, big)[crop], 1.0)
    return conc, cover


def _u(rng, lo, hi, n):
    return rng.uniform(lo, hi, size=n).astype(np.float32)


def _nuclei(rng, n, size, img, ys, xs, *, radius_um, aspect, px_um, angle=None,
            angle_jitter=np.pi, intensity, **kw):
    """Draw per-nucleus shape parameters (in µm) and splat them."""
    m = len(img)
    a = _u(rng, *radius_um, m) * px_um
    b = a * _u(rng, *aspect, m)
    a = np.maximum(a, 0.45)
    b = np.maximum(b, 0.45)
    if angle is None:
        theta = rng.uniform(0, np.pi, m)
    else:
        theta = angle[img] + rng.standard_normal(m) * angle_jitter
    inten = _u(rng, *intensity, m)
    kw = {k: (_u(rng, *v, m) if isinstance(v, tuple) else v) for k, v in kw.items()}
    return _stamp(n, size, img, ys, xs, a, b, theta, rng, intensity=inten, **kw)


# --------------------------------------------------------------------------- tissue types
def _tumour(rng, n, size, px_um):
    """Adenocarcinoma epithelium: crowded large pleomorphic vesicular nuclei around lumens."""
    g = _noise_fields(rng, n, size, 9.0 * px_um)
    lumen_level = _u(rng, 0.9, 2.2, n)[:, None, None]
    lumen = np.clip((g - lumen_level) * 3.0, 0.0, 1.0)
    rim = np.exp(-((g - lumen_level + 0.45) ** 2) / 0.25)  # epithelium lines the lumen
    density = np.clip(0.45 + 0.9 * rim - 1.5 * lumen, 0.02, None)
    counts = rng.integers(70, 140, size=n)
    img, ys, xs = _sample_points(rng, density, counts)
    h_nuc, cover = _nuclei(rng, n, size, img, ys, xs, radius_um=(3.2, 6.0), aspect=(0.55, 0.95),
                           px_um=px_um, intensity=(1.1, 1.9), irregular=(0.05, 0.22),
                           texture=(0.15, 0.35), vesicular=(0.25, 0.7), nucleolus=(0.2, 0.7))
    tex = _noise_fields(rng, n, size, 1.5 * px_um)
    cyto = (1.0 - lumen) * (1.0 - 0.7 * cover)
    h = h_nuc + cyto * (_u(rng, 0.12, 0.3, n)[:, None, None] + 0.04 * tex)
    e = cyto * (_u(rng, 0.3, 0.55, n)[:, None, None] + 0.08 * tex) + 0.03
    return h, e


def _stroma(rng, n, size, px_um):
    """Cancer-associated stroma: pink wavy collagen fibres with sparse spindle nuclei."""
    angle = rng.uniform(0, np.pi, n)
    bend = rng.uniform(0.2, 0.6, n)
    aniso = _u(rng, 4.0, 7.0, n)
    coarse = _noise_fields(rng, n, size, 8.0 * px_um)
    # fibres bundle in two slightly different directions, mixed by a smooth mask: wavy bundles
    mix = np.clip(0.5 + 0.6 * _noise_fields(rng, n, size, 14.0 * px_um), 0.0, 1.0)
    fib = (mix * _noise_fields(rng, n, size, 1.2 * px_um, anisotropy=aniso, angle=angle + bend)
           + (1.0 - mix) * _noise_fields(rng, n, size, 1.2 * px_um, anisotropy=aniso, angle=angle - bend))
    fib /= fib.std(axis=(1, 2), keepdims=True) + 1e-6
    gaps = np.clip(0.35 - 0.35 * coarse, 0.0, 1.0) * np.clip(-fib, 0.0, None)
    counts = rng.integers(18, 50, size=n)
    img, ys, xs = _sample_points(rng, np.ones((n, size, size), np.float32), counts)
    h_nuc, cover = _nuclei(rng, n, size, img, ys, xs, radius_um=(3.5, 7.0), aspect=(0.14, 0.3),
                           px_um=px_um, angle=angle + np.pi / 2, angle_jitter=0.25,
                           intensity=(1.2, 1.9), texture=(0.05, 0.15), irregular=(0.0, 0.06))
    # spindle nuclei follow the fibres: fibres run along ``angle`` in image space
    e_level = _u(rng, 0.5, 0.85, n)[:, None, None]
    e = np.clip(e_level * (1.0 + 0.22 * fib + 0.12 * coarse) - 0.35 * gaps, 0.05, None) * (1.0 - 0.5 * cover)
    h = h_nuc + _u(rng, 0.03, 0.09, n)[:, None, None]
    # a few lymphocytes scattered in the stroma
    lc = rng.integers(0, 14, size=n)
    li, ly, lx = _sample_points(rng, np.ones((n, size, size), np.float32), lc)
    h_l, _ = _nuclei(rng, n, size, li, ly, lx, radius_um=(2.3, 3.0), aspect=(0.85, 1.0),
                     px_um=px_um, intensity=(1.6, 2.2), texture=(0.03, 0.1))
    return h + h_l, e


def _lymphocytes(rng, n, size, px_um):
    """Lymphocyte aggregate: sheets of small, round, uniformly dark nuclei."""
    g = _noise_fields(rng, n, size, 10.0 * px_um)
    density = np.clip(1.0 + _u(rng, 0.0, 0.6, n)[:, None, None] * g, 0.1, None)
    counts = rng.integers(220, 420, size=n)
    img, ys, xs = _sample_points(rng, density, counts)
    h_nuc, cover = _nuclei(rng, n, size, img, ys, xs, radius_um=(2.2, 3.1), aspect=(0.85, 1.0),
                           px_um=px_um, intensity=(1.7, 2.5), texture=(0.03, 0.12),
                           irregular=(0.0, 0.05))
    tex = _noise_fields(rng, n, size, 2.0 * px_um)
    e = (_u(rng, 0.18, 0.35, n)[:, None, None] + 0.05 * tex) * (1.0 - 0.6 * cover) + 0.02
    h = h_nuc + _u(rng, 0.06, 0.14, n)[:, None, None]
    return h, e


def _adipose(rng, n, size, px_um):
    """Adipose tissue: large empty cells bounded by thin eosinophilic membranes."""
    # Voronoi cells from a jittered grid of seeds; the membrane is the band around
    # the bisector of the two nearest seeds (exact distance, so constant width).
    spacing = _u(rng, 32.0, 55.0, n) * px_um
    grid = int(np.ceil(size / float(spacing.min()))) + 3
    jit = (rng.random((n, grid, grid, 2)).astype(np.float32) - 0.5) * 0.7
    gy, gx = np.mgrid[0:grid, 0:grid].astype(np.float32)
    sy = (gy[None] - 1.0 + 0.5 + jit[..., 0]) * spacing[:, None, None]
    sx = (gx[None] - 1.0 + 0.5 + jit[..., 1]) * spacing[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = (yy[None] / spacing[:, None, None]).astype(np.int64) + 1
    cx = (xx[None] / spacing[:, None, None]).astype(np.int64) + 1
    ii = np.arange(n)[:, None, None]
    big = np.float32(1e12)
    d1 = np.full((n, size, size), big, np.float32)
    d2 = d1.copy()
    k1 = np.zeros((n, size, size), np.int8)
    k2 = k1.copy()
    offsets = [(oy, ox) for oy in (-1, 0, 1) for ox in (-1, 0, 1)]
    for j, (oy, ox) in enumerate(offsets):
        d = (yy - sy[ii, cy + oy, cx + ox]) ** 2 + (xx - sx[ii, cy + oy, cx + ox]) ** 2
        first = d < d1
        second = ~first & (d < d2)
        d2 = np.where(first, d1, np.where(second, d, d2))
        k2 = np.where(first, k1, np.where(second, np.int8(j), k2))
        d1 = np.where(first, d, d1)
        k1 = np.where(first, np.int8(j), k1)
    oy_t = np.array([o[0] for o in offsets])
    ox_t = np.array([o[1] for o in offsets])
    y1, x1 = sy[ii, cy + oy_t[k1], cx + ox_t[k1]], sx[ii, cy + oy_t[k1], cx + ox_t[k1]]
    y2, x2 = sy[ii, cy + oy_t[k2], cx + ox_t[k2]], sx[ii, cy + oy_t[k2], cx + ox_t[k2]]
    sep = np.sqrt((y1 - y2) ** 2 + (x1 - x2) ** 2) + 1e-6
    gap = (d2 - d1) / (2.0 * sep)  # distance to the bisector
    wob = _noise_fields(rng, n, size, 1.0 * px_um)
    width = (_u(rng, 0.4, 0.9, n) * px_um + 0.3)[:, None, None] * (1.0 + 0.3 * wob)
    membrane = np.clip(1.0 - gap / width + 0.5, 0.0, 1.0)
    e = membrane * _u(rng, 0.45, 0.8, n)[:, None, None] + 0.025
    counts = rng.integers(0, 4, size=n)
    img, ys, xs = _sample_points(rng, membrane + 1e-3, counts)
    h_nuc, _ = _nuclei(rng, n, size, img, ys, xs, radius_um=(3.0, 5.0), aspect=(0.25, 0.45),
                       px_um=px_um, intensity=(0.9, 1.5), texture=(0.05, 0.1))
    h = h_nuc + 0.12 * membrane + 0.01
    return h, e


def _mucus(rng, n, size, px_um):
    """Mucus: pale bluish-grey wisps with very few floating cells."""
    angle = rng.uniform(0, np.pi, n)
    wisp = (_noise_fields(rng, n, size, 2.0 * px_um, anisotropy=_u(rng, 2.0, 4.0, n), angle=angle)
            + 0.5 * _noise_fields(rng, n, size, 0.7 * px_um, anisotropy=3.0, angle=angle + 0.4))
    coarse = _noise_fields(rng, n, size, 12.0 * px_um)
    amount = np.clip(0.6 + 0.5 * coarse, 0.0, 1.0) * np.clip(0.5 + 0.4 * wisp, 0.0, None)
    h = amount * _u(rng, 0.25, 0.5, n)[:, None, None] + 0.03
    e = amount * _u(rng, 0.06, 0.16, n)[:, None, None] + 0.04
    counts = rng.integers(0, 8, size=n)
    img, ys, xs = _sample_points(rng, amount + 0.05, counts)
    h_nuc, _ = _nuclei(rng, n, size, img, ys, xs, radius_um=(2.5, 4.0), aspect=(0.7, 1.0),
                       px_um=px_um, intensity=(1.0, 1.8), texture=(0.05, 0.2))
    return h + h_nuc, e


def _debris(rng, n, size, px_um):
    """Necrotic debris: karyorrhectic nuclear fragments and eosinophilic clumps."""
    blobs = _noise_fields(rng, n, size, 4.0 * px_um)
    grain = _noise_fields(rng, n, size, 0.8 * px_um)
    clump = np.clip((blobs + _u(rng, -0.3, 0.6, n)[:, None, None]) * 1.5, 0.0, 1.0)
    e = clump * _u(rng, 0.5, 0.95, n)[:, None, None] * (1.0 + 0.25 * grain) + 0.06
    counts = rng.integers(50, 160, size=n)
    img, ys, xs = _clustered_points(rng, n, size, counts, 8, 6.0 * px_um)
    h_frag, _ = _nuclei(rng, n, size, img, ys, xs, radius_um=(0.7, 2.2), aspect=(0.5, 1.0),
                        px_um=px_um, intensity=(1.4, 2.6), irregular=(0.1, 0.3), texture=(0.0, 0.1))
    h = h_frag + np.clip(0.12 + 0.06 * grain, 0.0, None) * (0.4 + clump)
    return h, np.clip(e, 0.0, None)


_RENDERERS = [_tumour, _stroma, _lymphocytes, _adipose, _mucus, _debris]


# --------------------------------------------------------------------------- optics
def _stain_to_rgb(rng, h, e):
    """Beer–Lambert: per-image jittered stain vectors, strengths and illumination → uint8."""
    n = h.shape[0]
    vec = np.abs(HE_STAIN_VECTORS[None] + rng.normal(0.0, 0.05, (n, 2, 3)))
    vec /= np.linalg.norm(vec, axis=2, keepdims=True)
    # stain strength per stain times section thickness: staining varies a lot between slides
    vec = vec * rng.uniform(0.7, 1.4, (n, 2, 1)) * rng.uniform(0.7, 1.35, (n, 1, 1))
    vec = vec.astype(np.float32)
    io = np.clip(rng.uniform(236.0, 252.0, (n, 1)) + rng.normal(0.0, 2.5, (n, 3)), 0, 255).astype(np.float32)
    # overlapping nuclei saturate rather than turning black
    h = 2.8 * np.tanh(np.maximum(h, 0.0) / 2.8)
    e = np.maximum(e, 0.0)
    out = np.empty(h.shape + (3,), np.uint8)
    for c in range(3):
        od = h * vec[:, 0, c, None, None] + e * vec[:, 1, c, None, None]
        # sensor noise: uniform with std 2 grey levels (cheaper than Gaussian, looks the same)
        val = io[:, c, None, None] * np.exp(-od) + (rng.random(h.shape, dtype=np.float32) - 0.5) * 6.9
        out[..., c] = np.clip(np.rint(val), 0, 255)
    return out


def make_synthetic_he(n_per_class: int = 96, image_size: int = 64, seed: int = 0,
                      num_classes: int = 4):
    """Build the synthetic H&E demo set.

    Tissue-like classes are rendered as haematoxylin/eosin concentration maps and
    converted to RGB with a Beer–Lambert optical-density model (per-image stain
    vector, stain-strength and illumination jitter, mild blur and sensor noise).
    Classes, in order: ``tumour`` (crowded large pleomorphic vesicular nuclei
    around gland lumens), ``stroma`` (pink wavy fibres, spindle nuclei along
    them), ``lymphocytes`` (sheets of small round dark nuclei), ``adipose`` (large
    empty cells with thin membranes), ``mucus`` (pale bluish wisps), ``debris``
    (nuclear fragments and eosinophilic clumps). They stand in for the Kather
    classes of "More From Less" (Farndale et al., §2.3) when no real data is at
    hand.

    Args:
        n_per_class: int. Images per class.
        image_size: int. Side of the square tiles in pixels (>= 8). The field of view
            is fixed (~112 µm), so smaller tiles are lower-resolution versions.
        seed: int. Everything is determined by it.
        num_classes: int. 1 to 6 classes, taken in the order above.

    Returns:
        ``(images, labels, class_names)``: uint8 ``[N, S, S, 3]`` RGB, int64 ``[N]``
        labels, and the list of class names. Examples are shuffled (seeded).

    Example:
        >>> x, y, names = make_synthetic_he(4, 32, seed=1, num_classes=6)
        >>> x.shape, sorted(set(y.tolist()))
        ((24, 32, 32, 3), [0, 1, 2, 3, 4, 5])
    """
    if not 1 <= int(num_classes) <= len(CLASS_NAMES):
        raise DataError(f"synthetic data has 1..{len(CLASS_NAMES)} classes ({', '.join(CLASS_NAMES)}); "
                        f"got num_classes={num_classes}. Set data.synthetic_classes within that range.")
    if int(image_size) < 8:
        raise DataError(f"synthetic image_size must be >= 8 px, got {image_size}")
    if int(n_per_class) < 1:
        raise DataError(f"synthetic n_per_class must be >= 1, got {n_per_class}")
    n, size = int(n_per_class), int(image_size)
    px_um = size / FIELD_OF_VIEW_UM
    blur = 0.35 * px_um
    images, labels = [], []
    for k in range(int(num_classes)):
        rng = np.random.default_rng([int(seed), k])
        for s in range(0, n, _CHUNK):
            q = min(_CHUNK, n - s)
            h, e = _RENDERERS[k](rng, q, size, px_um)
            h, e = _blur(h, blur), _blur(e, blur)
            images.append(_stain_to_rgb(rng, h, e))
        labels.append(np.full(n, k, dtype=np.int64))
    x = np.concatenate(images)
    y = np.concatenate(labels)
    order = np.random.default_rng([int(seed), 1_000_003]).permutation(len(y))
    return x[order], y[order], list(CLASS_NAMES[: int(num_classes)])

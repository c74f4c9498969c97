"""Analytic shapes (ellipsoid, cylinder, tube, unions, region functions, lesions) evaluated on a
canvas, and the tissues and layers that paint them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


_LOBULATION = 0.15  # lesion radius varies by +-15% with direction


class _Hit(NamedTuple):
    inside: np.ndarray  # bool, region shape
    depth: np.ndarray  # approximate distance (mm) inside the surface
    aux: dict


def _rotation(degrees=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Local -> anatomical rotation Rz @ Ry @ Rx (angles in degrees)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Shape:
    frame = "anat"  # "world" for lesions (placed on the grid, not deformed with the anatomy)
    lo: np.ndarray
    hi: np.ndarray

    def hit(self, region) -> _Hit | None:
        raise NotImplementedError


class _Ellipsoid(_Shape):
    def __init__(self, centre, semi, rotation=None):
        self.centre = np.asarray(centre, np.float64)
        self.semi = np.asarray(semi, np.float64)
        self.rot = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
        half = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1))  # exact box of the rotated ellipsoid
        self.lo, self.hi = self.centre - half, self.centre + half

    def hit(self, region):
        d = [c - float(o) for c, o in zip(region.coords(self.frame), self.centre)]
        q2 = 0.0
        for i in range(3):
            col = self.rot[:, i] / self.semi[i]
            q2 = q2 + (float(col[0]) * d[0] + float(col[1]) * d[1] + float(col[2]) * d[2]) ** 2
        q = np.sqrt(q2)
        return _Hit(q < 1.0, (1.0 - q) * float(self.semi.min()), {})


class _Cylinder(_Shape):
    """Vertical elliptic cylinder (vertebral bodies, discs, arches)."""

    def __init__(self, centre, semi_xy, half_height):
        self.centre = np.asarray(centre, np.float64)
        self.semi = (float(semi_xy[0]), float(semi_xy[1]), float(half_height))
        self.lo, self.hi = self.centre - self.semi, self.centre + self.semi

    def hit(self, region):
        x, y, z = region.coords(self.frame)
        cx, cy, cz = (float(c) for c in self.centre)
        ax, ay, hh = self.semi
        q = np.maximum(np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2), np.abs(z - cz) / hh)
        return _Hit(q < 1.0, (1.0 - q) * min(self.semi), {})


class _Tube(_Shape):
    """A tube along a polyline with radii interpolated along it (vessels, bowel, ribs, pancreas).

    wave=(amplitude, wavelength_mm) modulates the radius along the arc length (colon haustra).
    aux["up"]: anterior offset from the axis in radii (+1 = front wall), for gas levels.
    """

    def __init__(self, points, radii, wave=(0.0, 1.0)):
        pts = np.asarray(points, np.float64)
        rad = np.broadcast_to(np.asarray(radii, np.float64), (len(pts),))
        self.amp, self.wavelength = float(wave[0]), float(wave[1])
        grow = 1.0 + self.amp
        self.segments, arc = [], 0.0
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            d = b - a
            length = float(np.linalg.norm(d))
            reach = max(ra, rb) * grow
            lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            self.segments.append((a, d, max(length**2, 1e-9), float(ra), float(rb), arc, length, lo, hi))
            arc += length
        self.lo = np.min([s[7] for s in self.segments], axis=0)
        self.hi = np.max([s[8] for s in self.segments], axis=0)

    def hit(self, region):
        q = np.full(region.shape, 1e6, np.float32)
        up = np.zeros(region.shape, np.float32)
        rad = np.ones(region.shape, np.float32)
        coords = region.coords(self.frame)
        for a, d, len2, ra, rb, arc, length, lo, hi in self.segments:
            rel = region.sub(lo, hi)
            if rel is None:
                continue
            p = [c[rel] - float(o) for c, o in zip(coords, a)]
            t = np.clip((p[0] * float(d[0]) + p[1] * float(d[1]) + p[2] * float(d[2])) / len2, 0.0, 1.0)
            e = [pk - t * float(dk) for pk, dk in zip(p, d)]
            r = ra + (rb - ra) * t
            if self.amp:
                r = r * (1.0 + self.amp * np.cos((arc + t * length) * (2 * np.pi / self.wavelength)))
            qs = np.sqrt(e[0] ** 2 + e[1] ** 2 + e[2] ** 2) / r
            better = qs < q[rel]
            q[rel] = np.where(better, qs, q[rel])
            up[rel] = np.where(better, e[1] / r, up[rel])
            rad[rel] = np.where(better, r, rad[rel])
        inside = q < 1.0
        return _Hit(inside, (1.0 - q) * rad, {"up": up}) if inside.any() else None


class _Union(_Shape):
    def __init__(self, *parts: _Shape):
        self.parts = parts
        self.lo = np.min([p.lo for p in parts], axis=0)
        self.hi = np.max([p.hi for p in parts], axis=0)

    def hit(self, region):
        hits = [h for h in (p.hit(region) for p in self.parts) if h is not None]
        if not hits:
            return None
        inside = np.logical_or.reduce([h.inside for h in hits])
        depth = np.maximum.reduce([np.where(h.inside, h.depth, -1e6) for h in hits])
        return _Hit(inside, depth, {})


class _Where(_Shape):
    """`shape` restricted to where keep(x, y, z) holds, minus the `minus` shapes."""

    def __init__(self, shape: _Shape, keep=None, minus: Sequence[_Shape] = ()):
        self.shape, self.keep, self.minus = shape, keep, tuple(minus)
        self.lo, self.hi, self.frame = shape.lo, shape.hi, shape.frame

    def hit(self, region):
        h = self.shape.hit(region)
        if h is None:
            return None
        inside = h.inside.copy()
        if self.keep is not None:
            x, y, z = region.coords(self.frame)
            inside[inside] = self.keep(x[inside], y[inside], z[inside])
        for other in self.minus:
            o = other.hit(region)
            if o is not None:
                inside &= ~o.inside
        return h._replace(inside=inside) if inside.any() else None


class _Loops(_Shape):
    """Bowel loops: the part of `shape` where a ~1 cm random field exceeds `threshold`."""

    def __init__(self, shape: _Shape, threshold: float):
        self.shape, self.threshold = shape, threshold
        self.lo, self.hi = shape.lo, shape.hi

    def hit(self, region):
        h = self.shape.hit(region)
        if h is None:
            return None
        x, y, z = region.coords(self.frame)
        inside = h.inside.copy()
        loops = region.fields.field("bowel-loops", 5.0).at(x[inside], y[inside], z[inside])
        inside[inside] = loops > self.threshold
        return h._replace(inside=inside)


class _Lesion(_Shape):
    """A lobulated ball in world coordinates (radius varies smoothly with direction)."""

    frame = "world"

    def __init__(self, centre, radius: float, rng: np.random.Generator):
        self.centre = np.asarray(centre, np.float64)
        self.radius = float(radius)
        waves = rng.normal(size=(3, 3))
        self.waves = waves / np.linalg.norm(waves, axis=1, keepdims=True)
        self.freq = rng.uniform(1.0, 2.5, 3) * np.pi
        self.phase = rng.uniform(0, 2 * np.pi, 3)
        self.reach = self.radius * (1 + _LOBULATION)
        self.lo, self.hi = self.centre - self.reach, self.centre + self.reach

    def hit(self, region):
        d = [c - float(o) for c, o in zip(region.coords(self.frame), self.centre)]
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        unit = [dk / np.maximum(dist, 1e-6) for dk in d]
        bumps = sum(np.cos(f * (w[0] * unit[0] + w[1] * unit[1] + w[2] * unit[2]) + p)
                    for w, f, p in zip(self.waves, self.freq, self.phase))
        r = self.radius * (1.0 + _LOBULATION * bumps / 3.0)
        q = dist / r
        inside = q < 1.0
        return _Hit(inside, (1.0 - q) * r, {}) if inside.any() else None


# ---------------------------------------------------------------- tissues and layers


@dataclass(frozen=True)
class _Tissue:
    """Base HU and texture amplitude (HU per unit of the texture field), optionally with a rim
    (cortical bone, kidney cortex, myocardium, bowel wall) and, for hollow organs, a gas cap:
    lumen voxels more than `gas_above` radii anterior of the axis hold air (patient supine)."""

    hu: float
    tex: float = 8.0
    rim_hu: float | None = None
    rim_mm: float = 2.0
    gas_above: float | None = None

    def values(self, hit: _Hit):
        hu = np.full(hit.inside.shape, self.hu, np.float32)
        tex = np.full(hit.inside.shape, self.tex, np.float32)
        if self.rim_hu is not None:
            hu += np.float32(self.rim_hu - self.hu) * np.clip(1.0 - hit.depth / self.rim_mm, 0.0, 1.0)
        if self.gas_above is not None:
            gas = (hit.aux["up"] > self.gas_above) & (hit.depth > self.rim_mm)
            hu[gas], tex[gas] = -1000.0, 0.0
        return hu, tex


class _Layer:
    """One painted structure: a shape, its MAISI label and its tissue."""

    def __init__(self, shape: _Shape, label: int, tissue: _Tissue):
        self.shape, self.label, self.tissue = shape, label, tissue
        self.lo, self.hi, self.frame = shape.lo, shape.hi, shape.frame

    def render(self, region):
        hit = self.shape.hit(region)
        if hit is None:
            return None
        hu, tex = self.tissue.values(hit)
        return hit.inside, self.label, hu, tex


def _paint(canvas, layer) -> None:
    region = canvas.region(layer.lo, layer.hi, layer.frame)
    if region is not None:
        out = layer.render(region)
        if out is not None:
            canvas.put(region, *out)

"""The torso template: every organ as a layer, sized and placed from the seed, in painting order.
"""

from __future__ import annotations

import math

import numpy as np

from maisi2.labels import BODY, LABELS, LUNG_IDS, TUMOR_PARENT, label_id
from maisi2.phantom.fields import _STREAM_ANATOMY
from maisi2.phantom.shapes import _Cylinder, _Ellipsoid, _Layer, _Loops, _Shape, _Tissue, _Tube, _Union, _Where, _rotation


_VERTEBRA_IDS = tuple(v for k, v in LABELS.items() if k.startswith("vertebrae"))


_FAT, _VISCERAL_FAT, _MUSCLE = _Tissue(-105, 8), _Tissue(-95, 12), _Tissue(50, 6)
_CORTEX_HU = 650.0
_SPINE_NAMES = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
                + ["S1"])
# Template (adult, mm): distance between vertebra centres and disc height, by region.
_PITCH = {"C": 16.0, "T_upper": 23.0, "T_lower": 26.0, "L": 35.0, "S": 35.0}
_DISC = {"C": 4.0, "T": 5.0, "L": 10.0, "S": 10.0}
_BODY_Z = np.array([-700.0, -250, -100, 0, 100, 200, 300, 700])
_BODY_A = np.array([172.0, 172, 168, 165, 160, 158, 160, 160])  # lateral semi-axis
_BODY_B = np.array([118.0, 120, 117, 114, 112, 110, 100, 100])  # antero-posterior semi-axis


def _spine_y_template(z):
    """Template y of the vertebral-body centres: lumbar lordosis forward, thoracic kyphosis back."""
    z = np.asarray(z, np.float64)
    return -46.0 + 5.0 * np.exp(-(((z + 150.0) / 130.0) ** 2)) - 5.0 * np.exp(-(((z - 120.0) / 120.0) ** 2))


class _Anatomy:
    """One body drawn from a seed: its geometry functions and the ordered list of painted layers."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_ANATOMY]))
        self.s = rng.uniform(0.92, 1.08)  # body size in the axial plane
        self.sz = rng.uniform(0.95, 1.05)  # craniocaudal size
        self.fat_mm = rng.uniform(8.0, 30.0)
        self.muscle_mm = rng.uniform(8.0, 14.0)
        self.dome_right = (25.0 + rng.uniform(-10, 10)) * self.sz
        self.dome_left = self.dome_right - rng.uniform(8, 22) * self.sz
        self.oblique = [(70.0 + rng.uniform(-12, 12)) * self.sz for _ in range(2)]  # right, left
        self.horizontal = (88.0 + rng.uniform(-10, 10)) * self.sz
        self.apex = 245.0 * self.sz
        self.parents: dict[str, tuple[tuple[int, ...], np.ndarray, np.ndarray]] = {}
        self.layers = (self._torso() + self._thorax(rng) + self._bowel(rng) + self._upper_gi(rng)
                       + self._solid_organs(rng) + self._vessels(rng) + self._muscles(rng)
                       + self._spine() + self._ribs(rng))

    # --- template -> this body
    def P(self, x, y, z) -> np.ndarray:
        return np.array([x * self.s, y * self.s, z * self.sz], np.float64)

    def jitter(self, rng, point, mm=6.0) -> np.ndarray:
        return np.asarray(point, np.float64) + rng.uniform(-mm, mm, 3)

    def size(self, rng, semi, frac=0.1) -> np.ndarray:
        scale = np.array([self.s, self.s, self.sz])[: len(semi)]
        return np.asarray(semi, np.float64) * scale * rng.uniform(1 - frac, 1 + frac, len(semi))

    def spine_y(self, z_template) -> float:
        return float(_spine_y_template(z_template))

    def tube(self, rng, path, jitter_mm=0.0, wave=(0.0, 1.0)) -> _Tube:
        """A tube through template points (x, y, z, radius): points jittered, radii varied by +-10%."""
        points = [self.jitter(rng, self.P(x, y, z), jitter_mm) for x, y, z, _ in path]
        radii = [r * self.s * rng.uniform(0.9, 1.1) for *_, r in path]
        return _Tube(points, radii, wave)

    def parent(self, lesion: str, organ: _Shape, ids=None) -> None:
        """Record where lesions of kind `lesion` may go: inside `organ` (labels `ids`, by default the
        fixed parent of the label table)."""
        ids = (TUMOR_PARENT[label_id(lesion)],) if ids is None else tuple(ids)
        self.parents[lesion] = (ids, organ.lo, organ.hi)

    # --- body envelope, cavity and diaphragm (vectorised over coordinates)
    def body_semi(self, z):
        zt = np.asarray(z) / self.sz
        a = np.interp(zt, _BODY_Z, _BODY_A).astype(np.float32) * np.float32(self.s)
        b = np.interp(zt, _BODY_Z, _BODY_B).astype(np.float32) * np.float32(self.s)
        return a, b

    def cage(self, z):
        """The rib cage narrows towards the lung apices."""
        return np.interp(np.asarray(z) / self.sz, [150.0, 290.0], [1.0, 0.55]).astype(np.float32)

    def cavity_semi(self, z):
        """Semi-axes (lateral, anterior, posterior) of the body cavity inside the muscle wall."""
        a, b = self.body_semi(z)
        cage = self.cage(z)
        wall = self.fat_mm + self.muscle_mm
        return ((a - wall) * cage, (b - 1.1 * self.fat_mm - self.muscle_mm) * cage,
                (b - 0.5 * self.fat_mm - self.muscle_mm - 8.0) * cage)

    def cavity_q2(self, x, y, z):
        a, b_front, b_back = self.cavity_semi(z)
        return (x / a) ** 2 + (y / np.where(y >= 0, b_front, b_back)) ** 2

    def diaphragm_z(self, x, y):
        s = self.s
        # The dome falls away steeply behind (posterior recess) and gently in front (xiphoid).
        ap = np.where(y < 5.0 * s, 35.0, 12.0) * ((y - 5.0 * s) / (80.0 * s)) ** 2
        right = self.dome_right - 40.0 * ((x + 65.0 * s) / (105.0 * s)) ** 2 - ap
        left = self.dome_left - 40.0 * ((x - 65.0 * s) / (105.0 * s)) ** 2 - ap
        # Costophrenic recesses: the lungs reach further down behind and at the sides.
        recess = (25.0 * np.clip((-y - 30.0 * s) / (50.0 * s), 0.0, 1.0) ** 2
                  + 30.0 * np.clip((np.abs(x) - 95.0 * s) / (40.0 * s), 0.0, 1.0) ** 2)
        return np.maximum(right, left) - recess

    def in_abdomen(self, x, y, z):
        return (z < self.diaphragm_z(x, y) - 4.0) & (self.cavity_q2(x, y, z) < 1.0)

    def in_thorax(self, x, y, z):
        return (z > self.diaphragm_z(x, y)) & (self.cavity_q2(x, y, z) < 1.0)

    def lobes(self, x, y, z):
        right = x < 5.0 * self.s
        lower = np.where(right, z + y < self.oblique[0], z + y < self.oblique[1])
        ids = [np.uint8(label_id(n)) for n in ("right lung lower lobe", "right lung middle lobe",
                                               "right lung upper lobe", "left lung lower lobe", "left lung upper lobe")]
        rll, rml, rul, lll, lul = ids
        return np.where(right, np.where(lower, rll, np.where(z < self.horizontal, rml, rul)),
                        np.where(lower, lll, lul))

    # --- layers, in painting order
    def _torso(self):
        lungs_lo, lungs_hi = self.P(-200, -150, -120), self.P(200, 150, 0)
        lungs_hi[2] = self.apex
        self.parents["lung tumor"] = (LUNG_IDS, lungs_lo, lungs_hi)  # the lobe around it is its parent
        return [_TorsoLayer(self)]

    def _thorax(self, rng):
        P, s = self.P, self.s
        mediastinum = _Where(_Cylinder(P(5, 5, 200), (38 * s, 85 * s), 260 * self.sz), keep=self.in_thorax)
        heart = _Where(_Ellipsoid(self.jitter(rng, P(20, 25, 62)), self.size(rng, (62, 48, 58)),
                                  _rotation((0, -20 + rng.uniform(-8, 8), 30 + rng.uniform(-10, 10)))),
                       keep=self.in_thorax)
        ys = self.spine_y
        trachea = _Tube([P(0, ys(400) + 50, 400), P(0, ys(165) + 48, 165)], 9 * s)
        esophagus = _Tube([P(4, ys(400) + 22, 400), P(6, ys(100) + 24, 100), P(14, ys(30) + 30, 30),
                           P(32, -14, 4), P(46, -18, -4)], 7.5 * s)
        return [_Layer(mediastinum, BODY, _Tissue(-85, 10)),
                _Layer(heart, label_id("heart"), _Tissue(140, 6, rim_hu=55, rim_mm=9)),
                _Layer(trachea, label_id("trachea"), _Tissue(-1000, 0, rim_hu=30, rim_mm=2)),
                _Layer(esophagus, label_id("esophagus"), _Tissue(40, 6))]

    def _bowel(self, rng):
        P = self.P
        region = _Where(_Ellipsoid(self.jitter(rng, P(0, 25, -215), 10), self.size(rng, (105, 65, 95))),
                        keep=self.in_abdomen)
        path = [(-75, 10, -270, 30), (-90, -10, -200, 26), (-95, -5, -140, 25), (-80, 20, -112, 25),
                (-40, 55, -132, 24), (0, 60, -150, 24), (40, 55, -130, 24), (88, 10, -75, 23),
                (100, -15, -110, 21), (100, -10, -200, 20), (60, 20, -270, 20), (10, 0, -300, 18)]
        colon = _Where(self.tube(rng, path, 6, wave=(0.12, 42.0)), keep=self.in_abdomen)  # wave: haustra
        self.parent("colon cancer primaries", colon)
        return [_Layer(_Loops(region, -0.25), label_id("small bowel"), _Tissue(30, 18)),
                _Layer(colon, label_id("colon"), _Tissue(-60, 70, rim_hu=40, rim_mm=3, gas_above=0.25))]

    def _upper_gi(self, rng):
        # Fundus under the left dome, body, antrum across to the pylorus; then the duodenal C-loop.
        stomach = self.tube(rng, [(52, -22, 2, 38), (72, 8, -30, 36), (62, 40, -68, 30), (25, 55, -88, 22),
                                  (-15, 42, -92, 13)], 5)
        duodenum = self.tube(rng, [(-15, 42, -92, 13), (-42, 22, -100, 13), (-55, 5, -125, 13), (-50, 0, -150, 13),
                                   (-20, 5, -163, 13), (15, 5, -155, 13), (32, 10, -130, 13)], 4)
        return [_Layer(_Where(stomach, keep=self.in_abdomen), label_id("stomach"),
                       _Tissue(15, 10, rim_hu=45, rim_mm=4, gas_above=0.35)),
                _Layer(_Where(duodenum, keep=self.in_abdomen), label_id("duodenum"),
                       _Tissue(20, 10, rim_hu=45, rim_mm=2.5, gas_above=0.55))]

    def _solid_organs(self, rng):
        P, jit, size = self.P, self.jitter, self.size
        right_lobe = _Ellipsoid(jit(rng, P(-62, 2, -48), 8), size(rng, (80, 84, 80)),
                                _rotation((0, rng.uniform(-10, 10), rng.uniform(-10, 10))))
        left_lobe = _Ellipsoid(jit(rng, P(18, 38, -12), 8), size(rng, (62, 40, 36)),
                               _rotation((0, 0, 20 + rng.uniform(-8, 8))))
        liver = _Where(_Union(right_lobe, left_lobe), keep=self.in_abdomen)
        spleen_c = jit(rng, P(98, -38, -40), 6)
        spleen_rot = _rotation((0, 0, -35 + rng.uniform(-8, 8)))
        spleen_semi = size(rng, (22, 50, 52))
        # Crescent: the concave visceral surface (hilum) is cut away on the medial side.
        hilum = _Ellipsoid(spleen_c + spleen_rot @ np.array([-34.0 * self.s, 0, 0]), spleen_semi * [0.9, 0.7, 0.8],
                           spleen_rot)
        spleen = _Where(_Ellipsoid(spleen_c, spleen_semi, spleen_rot), keep=self.in_abdomen, minus=[hilum])
        # Head in the duodenal C-loop, neck and body across the aorta, tail up to the splenic hilum.
        pancreas = _Where(self.tube(rng, [(-32, 6, -118, 19), (-8, 18, -100, 12), (28, 14, -88, 13),
                                          (66, -2, -74, 11), (88, -18, -62, 9)], 5), keep=self.in_abdomen)
        gallbladder = _Where(_Ellipsoid(jit(rng, P(-42, 42, -98), 6), size(rng, (15, 15, 32), 0.2),
                                        _rotation((-35, 0, 0))), keep=self.in_abdomen)
        self.parent("hepatic tumor", liver)
        self.parent("pancreatic tumor", pancreas)
        return [_Layer(liver, label_id("liver"), _Tissue(60, 8)),
                _Layer(spleen, label_id("spleen"), _Tissue(52, 6)),
                *self._kidneys(rng),
                _Layer(pancreas, label_id("pancreas"), _Tissue(50, 14)),
                _Layer(gallbladder, label_id("gallbladder"), _Tissue(10, 3, rim_hu=35, rim_mm=2))]

    def _kidneys(self, rng):
        layers = []
        for side, name, z in ((1, "left", -80), (-1, "right", -95)):
            centre = self.jitter(rng, self.P(72 * side, -38, z), 6)
            semi = self.size(rng, (26, 20, 54))
            # Upper pole tilted medially, hilum facing antero-medially.
            rot = _rotation((0, -side * (12 + rng.uniform(-5, 5)), -side * (30 + rng.uniform(-8, 8))))
            kidney = _Where(_Ellipsoid(centre, semi, rot), keep=self.in_abdomen)
            sinus = _Ellipsoid(centre + rot @ np.array([-side * 0.6 * semi[0], 0, 0]), semi * [0.45, 0.5, 0.5], rot)
            # Perirenal fat: a fat capsule that separates the kidney from the liver, spleen and bowel.
            capsule = _Where(_Ellipsoid(centre, semi + 9.0 * self.s, rot), keep=self.in_abdomen)
            self.parent(f"{name} kidney cyst", kidney)
            layers += [_Layer(capsule, BODY, _Tissue(-90, 12)),
                       # Contrast: bright cortex over a darker medulla.
                       _Layer(kidney, label_id(f"{name} kidney"), _Tissue(135, 10, rim_hu=205, rim_mm=7)),
                       _Layer(sinus, BODY, _Tissue(-70, 10))]
        return layers

    def _vessels(self, rng):
        ys = self.spine_y
        # Ascending aorta out of the heart, the arch, then down in front of the spine.
        aorta_path = [(-2, 28, 55, 15), (-5, 28, 130, 15), (5, 5, 185, 13), (26, -28, 165, 12),
                      (28, ys(100) + 18, 100, 12), (22, ys(0) + 22, 0, 11.5), (16, ys(-100) + 28, -100, 10.5),
                      (12, ys(-190) + 30, -190, 9.5), (10, ys(-230) + 30, -230, 9)]
        ivc_path = [(-22, ys(-250) + 26, -250, 11), (-23, ys(-130) + 28, -130, 11), (-26, ys(-40) + 34, -40, 12),
                    (-18, ys(0) + 45, 0, 12), (-12, 10, 22, 13)]
        # Splenic vein along the back of the pancreas, then the portal vein up into the liver hilum.
        portal_path = [(85, -32, -60, 5), (62, -18, -76, 5.5), (25, -4, -90, 6), (-5, 0, -102, 7), (-25, 2, -82, 7.5),
                       (-42, 0, -58, 6.5)]
        aorta, ivc, portal = (self.tube(rng, path, 3) for path in (aorta_path, ivc_path, portal_path))
        return [_Layer(aorta, label_id("aorta"), _Tissue(165, 5)),  # portal-venous phase contrast
                _Layer(ivc, label_id("inferior vena cava"), _Tissue(130, 5)),
                _Layer(_Where(portal, keep=self.in_abdomen), label_id("portal vein and splenic vein"), _Tissue(150, 5))]

    def _muscles(self, rng):
        ys = self.spine_y
        layers = []
        for side, name in ((1, "left"), (-1, "right")):
            # Psoas: from T12 beside the vertebral bodies, widening towards the pelvis.
            psoas = self.tube(rng, [(side * x, ys(z) + y, z, r) for x, y, z, r in
                                    [(28, 0, -40, 8), (38, 2, -110, 18), (48, 5, -200, 24), (55, 12, -290, 26)]])
            # Autochthon (erector spinae): behind the transverse processes, the whole length of the spine.
            back = self.tube(rng, [(side * x, ys(z) + y, z, r) for x, y, z, r in
                                   [(36, -38, -700, 27), (36, -38, -150, 27), (36, -36, 0, 22), (34, -34, 150, 20),
                                    (30, -30, 700, 16)]])
            layers += [_Layer(_Where(psoas, keep=self.in_body), label_id(f"{name} iliopsoas"), _Tissue(55, 6)),
                       _Layer(_Where(back, keep=self.in_body), label_id(f"{name} autochthon"), _Tissue(48, 7))]
        return layers

    def in_body(self, x, y, z):
        a, b = self.body_semi(z)
        return (x / a) ** 2 + (y / b) ** 2 < 0.97

    def vertebra_levels(self):
        """(name, template z of the centre, body half-height) from C1 to S1, T11 centred at z = -10."""
        pitch, disc = [], []
        for name in _SPINE_NAMES:
            region = name[0]
            if region == "T":
                pitch.append(_PITCH["T_upper"] if int(name[1:]) <= 6 else _PITCH["T_lower"])
            else:
                pitch.append(_PITCH[region])
            disc.append(_DISC[region])
        centres = np.zeros(len(_SPINE_NAMES))
        anchor = _SPINE_NAMES.index("T11")
        centres[anchor] = -10.0
        for i in range(anchor + 1, len(centres)):
            centres[i] = centres[i - 1] - (pitch[i - 1] + pitch[i]) / 2
        for i in range(anchor - 1, -1, -1):
            centres[i] = centres[i + 1] + (pitch[i] + pitch[i + 1]) / 2
        return [(n, float(z), (p - d) / 2) for n, z, p, d in zip(_SPINE_NAMES, centres, pitch, disc)]

    def _vertebra_dims(self, zt):
        knots = [-250.0, -60, 150, 240, 320]
        return (float(np.interp(zt, knots, [26, 23, 17, 15, 10])), float(np.interp(zt, knots, [19, 17, 14, 12, 9])))

    def _spine(self):
        s, sz = self.s, self.sz
        levels = self.vertebra_levels()
        body_bone = _Tissue(230, 35, rim_hu=_CORTEX_HU, rim_mm=1.8)
        arch_bone = _Tissue(380, 30, rim_hu=_CORTEX_HU, rim_mm=1.5)
        layers, canal_points, cord_points = [], [], []
        for i, (name, zt, half) in enumerate(levels):
            ax, ay = self._vertebra_dims(zt)
            yb = self.spine_y(zt)
            canal_y = yb - ay - 9.0
            label = label_id(f"vertebrae {name}")
            parts = self._vertebra_parts(zt, half, ax, ay, yb, canal_y, lumbar=name[0] in "LS")
            layers.append(_Layer(_Cylinder(self.P(0, yb, zt), (ax * s, ay * s), half * sz), label, body_bone))
            layers += [_Layer(p, label, arch_bone) for p in parts]
            if i + 1 < len(levels):  # the disc below
                z_next, half_next = levels[i + 1][1], levels[i + 1][2]
                top, bottom = zt - half, z_next + half_next
                zc = (top + bottom) / 2
                disc = _Cylinder(self.P(0, self.spine_y(zc), zc), (ax * s, ay * s), (top - bottom) / 2 * sz)
                layers.append(_Layer(disc, BODY, _Tissue(85, 8)))
            canal_points.append(self.P(0, canal_y, zt))
            if zt > -80:  # the cord ends at L1 (conus); below it only fluid and nerve roots
                cord_points.append(self.P(0, canal_y, zt))
        layers.append(_Layer(_Tube(canal_points, 9.0 * s), BODY, _Tissue(15, 3)))
        layers.append(_Layer(_Tube(cord_points, 5.0 * s), label_id("spinal cord"), _Tissue(35, 3)))
        self.parent("bone lesion", _Union(*(layer.shape for layer in layers)), ids=_VERTEBRA_IDS)
        return layers

    def _vertebra_parts(self, zt, half, ax, ay, yb, canal_y, lumbar):
        """Posterior elements: the arch around the canal, the spinous and the transverse processes."""
        P, s, sz = self.P, self.s, self.sz
        arch = _Where(_Cylinder(P(0, canal_y, zt), (15 * s, 13 * s), 0.75 * half * sz),
                      minus=[_Cylinder(P(0, canal_y, zt), (9.5 * s, 8 * s), 2 * half * sz)])
        length, tilt = (30.0, 0.2) if lumbar else (34.0, 0.7)
        direction = np.array([0.0, -math.cos(tilt), -math.sin(tilt)])  # backwards and down
        frame = np.stack([[1.0, 0, 0], direction, np.cross([1.0, 0, 0], direction)], axis=1)
        spinous = _Ellipsoid(P(0, canal_y - 10, zt) + direction * (length / 2) * s, [4.5 * s, length / 2 * s, 7 * s],
                             frame)
        parts = [arch, spinous]
        span = 30.0 if lumbar else 24.0
        for side in (1, -1):
            angle = -side * (15.0 if lumbar else 35.0)  # thoracic processes point back to meet the ribs
            rot = _rotation((0, 0, angle))
            centre = P(side * (ax * 0.45), canal_y + 4, zt) + rot @ np.array([side * span / 2 * s, 0, 0])
            parts.append(_Ellipsoid(centre, [span / 2 * s, 5 * s, 6 * s], rot))
        return parts

    def _ribs(self, rng):
        layers = []
        levels = {n: (z, h) for n, z, h in self.vertebra_levels()}
        ends = [2.8] * 6 + [2.75, 2.55, 2.35, 2.15, 1.6, 1.15]  # angular extent from the spine (radians)
        rib_bone = _Tissue(260, 30, rim_hu=_CORTEX_HU, rim_mm=1.6)
        for k in range(1, 13):
            zt = levels[f"T{k}"][0] + 4.0
            drop = (45.0 + 6.5 * k) * rng.uniform(0.9, 1.1)  # posterior end to anterior end
            radius = (6.0 if k == 1 else 4.0 if k >= 11 else 4.6) * self.s
            for side, name in ((1, "left"), (-1, "right")):
                points = self._rib_path(zt, drop, ends[k - 1] + rng.uniform(-0.08, 0.08), side)
                layers.append(_Layer(_Tube(points, radius), label_id(f"{name} rib {k}"), rib_bone))
        front = [self.P(0, 0, z) for z in (40.0, 120.0, 210.0)]
        for p in front:  # sternum sits in the anterior chest wall
            p[1] = float(self.cavity_semi(np.float32(p[2]))[1]) + 7.0 * self.s
        layers.append(_Layer(_Tube(front, [8.0 * self.s, 9.0 * self.s, 10.0 * self.s]), label_id("sternum"),
                             _Tissue(280, 30, rim_hu=600, rim_mm=1.5)))
        return layers

    def _rib_path(self, zt, drop, end, side):
        """Rib centreline: from the costovertebral joint round the cavity wall, sloping down."""
        ax, ay = self._vertebra_dims(zt)
        start = 0.32
        points = [self.P(side * ax * 0.8, self.spine_y(zt) - 0.3 * ay, zt)]
        for phi in np.linspace(start, end, max(3, int(np.ceil((end - start) / 0.12)) + 1)):
            z = (zt - drop * (phi - start) / (np.pi - start)) * self.sz
            a, b_front, b_back = (float(v) for v in self.cavity_semi(np.float32(z)))
            sx, cy = math.sin(phi), -math.cos(phi)
            b = b_front if cy >= 0 else b_back
            rho = 1.0 / math.sqrt((sx / a) ** 2 + (cy / b) ** 2) + 5.0 * self.s  # just outside the cavity
            points.append(np.array([side * rho * sx, rho * cy, z]))
        return points


class _TorsoLayer:
    """Skin to cavity in one pass: subcutaneous fat, muscle wall, and inside the cavity the lungs
    (by lobe) above the diaphragm, visceral fat below it."""

    frame = "anat"

    def __init__(self, anatomy: _Anatomy):
        self.anatomy = anatomy
        self.lo, self.hi = np.full(3, -np.inf), np.full(3, np.inf)

    def render(self, region):
        an = self.anatomy
        x, y, z = region.coords("anat")
        a, b = an.body_semi(z)
        inside = (x / a) ** 2 + (y / b) ** 2 < 1.0
        if not inside.any():
            return None
        fat = an.fat_mm
        wall_b = np.where(y >= 0, b - 1.1 * fat, b - 0.5 * fat)
        muscle = (x / (a - fat)) ** 2 + (y / wall_b) ** 2 < 1.0
        cavity = an.cavity_q2(x, y, z) < 1.0
        dome = an.diaphragm_z(x, y)
        lungs = cavity & (z > dome) & (z < an.apex)
        label = np.full(region.shape, BODY, np.uint8)
        hu = np.full(region.shape, _FAT.hu, np.float32)
        tex = np.full(region.shape, _FAT.tex, np.float32)
        diaphragm = cavity & (np.abs(z - dome + 2.0) <= 2.0)  # a 4 mm muscle sheet under the lungs
        for mask, tissue in ((muscle, _MUSCLE), (cavity, _VISCERAL_FAT), (diaphragm, _MUSCLE)):
            hu[mask], tex[mask] = tissue.hu, tissue.tex
        label[lungs] = an.lobes(x[lungs], y[lungs], z[lungs])
        hu[lungs], tex[lungs] = -860.0, 25.0
        return inside, label, hu, tex

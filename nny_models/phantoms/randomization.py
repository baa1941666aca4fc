"""Domain randomization of the phantom world: the ranges every appearance / anatomy parameter is drawn from.

Two named configurations ship:

- ``"train"`` (the default of generate_phantom / write_dataset): the whole world the models are trained on.
- ``"ood"``: a shifted held-out world whose parameters lie at the edges of, or outside, the training ranges
  (thicker slices, more noise, coarser grain and blur, mostly hyper- / iso-dense and small lesions, mostly
  arterial or delayed phase, larger bodies, smaller livers, more cut-off fields of view, a table in every case
  and arms down in half of them). Use it only for evaluation, never for training.

A caller restricts the world with ``dataclasses.replace(RANDOMIZATIONS["train"], tumor_kinds=("hypo",), ...)``.

Contrast phases set the HU of liver, vessels and kidneys (``PHASE_HU``): in the arterial phase the aorta is
bright and the portal vein only starts to fill, the portal-venous phase has the liver at its brightest, and
in the delayed phase vessels and parenchyma converge; an unenhanced (non-contrast) scan has blood at 35-50 HU
and the liver only a little above the spleen. A fatty liver (steatosis) loses 10-40 HU in every phase, so it may
lie below the spleen and, unenhanced, below its own vessels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

PHASES = ("arterial", "portal_venous", "delayed", "unenhanced")
TUMOR_KINDS = ("hypo", "iso", "hyper")  # viable tumor darker than, like, or brighter than the liver

# HU ranges (low, high) per phase. hv: hepatic veins; cortex / medulla: kidney. Values from multiphase CT
# literature (late arterial ~35 s, portal-venous ~70 s, delayed ~3-5 min after injection).
PHASE_HU = {
    "arterial": dict(liver=(65, 90), pv=(110, 160), hv=(55, 85), aorta=(250, 350), ivc=(70, 110),
                     spleen=(95, 140), cortex=(170, 250), medulla=(70, 110), pancreas=(95, 130), heart=(180, 300)),
    "portal_venous": dict(liver=(100, 125), pv=(160, 195), hv=(140, 185), aorta=(150, 200), ivc=(125, 150),
                          spleen=(105, 125), cortex=(150, 185), medulla=(100, 125), pancreas=(80, 105), heart=(130, 180)),
    "delayed": dict(liver=(80, 105), pv=(110, 140), hv=(105, 135), aorta=(110, 150), ivc=(105, 135),
                    spleen=(90, 110), cortex=(120, 160), medulla=(120, 160), pancreas=(70, 95), heart=(105, 140)),
    # No contrast medium: blood 35-50 HU, the liver 8-15 HU above the spleen, the kidney's cortex and medulla alike.
    "unenhanced": dict(liver=(50, 70), pv=(35, 50), hv=(35, 50), aorta=(35, 50), ivc=(35, 50),
                       spleen=(40, 55), cortex=(28, 40), medulla=(25, 38), pancreas=(35, 50), heart=(35, 50)),
}


@dataclass(frozen=True)
class Randomization:
    """Ranges (low, high) drawn uniformly per case unless stated; probabilities per case or per lesion."""

    name: str = "train"  # shown in dataset.json
    phases: tuple[str, ...] = PHASES  # contrast phases drawn from ...
    phase_probs: tuple[float, ...] = (0.25, 0.5, 0.15, 0.1)  # ... with these probabilities
    tumor_kinds: tuple[str, ...] = TUMOR_KINDS  # lesion density relative to the liver, drawn per lesion ...
    tumor_kind_probs: tuple[float, ...] = (0.6, 0.2, 0.2)  # ... with these probabilities
    tumor_contrast_hu: tuple[float, float] = (20.0, 70.0)  # |viable tumor - liver| HU of hypo / hyper lesions
    no_tumor_prob: float = 0.1  # probability that a case has no lesion at all
    max_tumors: int = 10  # lesion count: the clinical history's (1-6), sometimes more, at most this
    tumor_diameter_mm: tuple[float, float] = (3.0, 60.0)  # lesion diameters, log-uniform (tumors.sample_diameters)
    rim_prob: float = 0.3  # enhancing rim (ring of +30..60 HU, ~12 % of the radius) per lesion
    capsule_prob: float = 0.3  # thin fibrous capsule (1-2.5 mm; bright in the delayed phase, dark otherwise)
    necrosis_prob: float = 0.4  # necrotic core (10-30 HU) for lesions over 16 mm
    slice_thickness_mm: tuple[float, float] = (0.7, 6.0)  # slice profile (FWHM); z spacing = max(this, preset min)
    noise_hu: tuple[float, float] = (8.0, 25.0)  # CT noise std (scaled up for obese patients)
    noise_grain_vox: tuple[float, float] = (0.5, 1.3)  # in-plane correlation of the noise (reconstruction kernel)
    blur_mm: tuple[float, float] = (0.0, 1.0)  # in-plane Gaussian blur sigma (soft kernel / low dose smoothing)
    partial_fov_prob: float = 0.25  # probability that the scan cuts the liver off at the top or the bottom
    body_scale: tuple[float, float] = (0.85, 1.15)  # body width / depth factor (habitus, on top of obesity)
    liver_scale: tuple[float, float] = (0.85, 1.15)  # liver size factor
    liver_shift_mm: float = 15.0  # liver displaced by up to this in x and y (it stays under the diaphragm)
    liver_shape_jitter: float = 0.15  # each liver lobe's radii scaled by 1 +- this (shape variation)
    liver_like_neighbours_prob: float = 0.5  # spleen, stomach wall and heart wall drawn with liver-like HU
    table_prob: float = 0.9  # patient table (carbon-fibre couch, usually a foam mattress) under the back
    arms_prob: float = 0.25  # arms down beside the trunk (humerus / forearm bones in the field of view)
    steatosis_prob: float = 0.15  # fatty liver (drawn from its own generator: steatosis_drop) ...
    steatosis_hu: tuple[float, float] = (10.0, 40.0)  # ... losing this many HU of its phase's attenuation

    def __post_init__(self):
        for name, choices, allowed in (("phases", self.phases, PHASES), ("tumor_kinds", self.tumor_kinds, TUMOR_KINDS)):
            if not choices or set(choices) - set(allowed):
                raise ValueError(f"Randomization.{name}: expected a non-empty subset of {allowed}, got {choices}")
        for name, choices, probs in (("phase_probs", self.phases, self.phase_probs),
                                     ("tumor_kind_probs", self.tumor_kinds, self.tumor_kind_probs)):
            if len(probs) != len(choices) or min(probs) < 0 or not np.isclose(sum(probs), 1.0):
                raise ValueError(f"Randomization.{name}: expected {len(choices)} probabilities summing to 1, got {probs}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_prob") and not 0.0 <= v <= 1.0:
                raise ValueError(f"Randomization.{f.name}: expected a probability in [0, 1], got {v}")
            if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, float) for x in v) and not 0 <= v[0] <= v[1]:
                raise ValueError(f"Randomization.{f.name}: expected 0 <= low <= high, got {v}")
        if self.tumor_diameter_mm[0] <= 0 or self.slice_thickness_mm[0] <= 0 or self.body_scale[0] <= 0:
            raise ValueError("Randomization: tumor_diameter_mm, slice_thickness_mm and body_scale must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RANDOMIZATIONS = {
    "train": Randomization(),
    # Shifted held-out world: every range sits at the edge of or outside "train" (see the module docstring).
    "ood": Randomization(
        name="ood", phases=("arterial", "delayed"), phase_probs=(0.5, 0.5),
        tumor_kind_probs=(0.2, 0.3, 0.5), tumor_contrast_hu=(15.0, 80.0), no_tumor_prob=0.0,
        tumor_diameter_mm=(3.0, 40.0), rim_prob=0.5, capsule_prob=0.5,
        slice_thickness_mm=(5.0, 7.5), noise_hu=(22.0, 35.0), noise_grain_vox=(1.2, 1.8), blur_mm=(0.8, 1.6),
        partial_fov_prob=0.5, body_scale=(1.1, 1.25), liver_scale=(0.75, 0.9), liver_shift_mm=25.0,
        liver_shape_jitter=0.25, liver_like_neighbours_prob=0.9, table_prob=1.0, arms_prob=0.5,
        steatosis_prob=0.0,  # as in generator v4, so that its scores stay comparable; fatty livers: "unenhanced"
    ),
    # Non-contrast scans, half of them of fatty livers: the training world's edge (it has 10 % unenhanced
    # scans and 15 % fatty livers). Without contrast medium an enhancing rim cannot show, lesions differ less
    # from the parenchyma, and hyperdense ones are rare (blood, calcium), so none are drawn.
    "unenhanced": Randomization(
        name="unenhanced", phases=("unenhanced",), phase_probs=(1.0,), tumor_kind_probs=(0.7, 0.3, 0.0),
        steatosis_prob=0.5,
    ),
}


def get_randomization(r: "str | Randomization | None") -> Randomization:
    if r is None:
        return RANDOMIZATIONS["train"]
    if isinstance(r, Randomization):
        return r
    if r not in RANDOMIZATIONS:
        raise ValueError(f"unknown phantom randomization {r!r}; expected one of {sorted(RANDOMIZATIONS)}")
    return RANDOMIZATIONS[r]


def steatosis_drop(seed: int, rand: Randomization) -> float:
    """HU the case's liver loses to fat (0.0 for a normal liver). From its own generator, so that every other
    draw of the case is the same whether or not its liver is fatty."""
    rng = np.random.default_rng([int(seed), 0xFA7])
    return uniform(rng, rand.steatosis_hu) if rng.random() < rand.steatosis_prob else 0.0


def uniform(rng: np.random.Generator, rng_range: tuple[float, float]) -> float:
    return float(rng.uniform(*rng_range))


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def phase_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One draw of every tissue HU of ``phase``."""
    return {k: uniform(rng, v) for k, v in PHASE_HU[phase].items()}

"""Registration parameters and presets: every knob, its unit and its default, documented once here.

Unit: ``v`` = the target image's smallest voxel spacing (mm). Working-grid spacings, step sizes and
control-grid spacings are multiples of ``v`` (like ANTs' shrink factors), so one preset fits brains at
2 mm and knees at 0.7 mm; all computations themselves are in physical space (LPS mm), so anisotropic,
oblique and differently gridded atlases and targets are handled. A "level" is one resolution of the
multi-resolution pyramid; tuple-valued knobs give one value per level, coarse to fine, and the tuples
of one stage must have the same length.

Affine stage (12 degrees of freedom, maps target LPS mm -> atlas LPS mm)
    init                  "moments" (the one initialisation; a field of the params so that reports and the
                          benchmarks' cache keys keep it): centres of intensity mass + isotropic scale from
                          second moments.
    affine_shrink         working-grid spacing per level, in v. The target is block-averaged and
                          resampled to a grid of this spacing over its own field of view (never finer than
                          its voxels); atlases likewise over theirs.
    affine_iterations     Adam iterations per level.
    affine_lr             Adam step, in v: for the translation, and for the 3x3 part scaled by the target's
                          radius of gyration r (so one step moves a point at distance r by about this much).
    affine_similarity     "ncc" (global normalised cross-correlation) or "lncc".

Deformable stage (dense displacement on a control grid, on top of the affine)
    deform_shrink         working-grid spacing per level, in v, on which images are compared.
    control_shrink        spacing, in v, of the grid that carries the displacement (or velocity)
                          parameters per level; it is trilinearly upsampled to the working grid, so it
                          sets the finest detail a deformation can have.
    deform_iterations     Adam iterations per level.
    deform_lr             Adam step (displacement per iteration) per level, in v; cosine decay to 5 %.
    similarity            "lncc" (local NCC, squared, as ANTs' CC) or "ncc".
    lncc_window           side of the LNCC window, in voxels of each working grid (odd, >= 3).
    bending_weight        weight of the bending energy of the control-grid displacement measured in
                          control-grid voxels (dimensionless), against a dissimilarity in [0, 1].
    diffusion_weight      weight of the diffusion term (mean squared gradient of the displacement,
                          dimensionless).
    folding_weight        weight of the folding barrier (losses.folding_barrier: mean relu(0.2 - det J)^2 of the
                          control-grid displacement, dimensionless; 0 = off). Zero unless a control cell
                          shrinks below 20 % of its volume, so it removes folds without stiffening the field
                          (the diffeomorphic mode does not need it).
    diffeomorphic         optimise a stationary velocity field and integrate it by scaling and squaring.
    svf_steps             number of squarings (the velocity is divided by 2^svf_steps).
    deform_optimizer      "adam" (the above: control grid, Adam, penalties) or "greedy": the greedy tool's
                          algorithm (deformable.optimize_greedy; docs/registration.md "greedy-style
                          optimiser"): a dense displacement on each working grid (control_shrink, deform_lr,
                          bending/diffusion/folding weights unused; diffeomorphic must be false), per iteration
                          the LNCC gradient smoothed, scaled to a fixed longest step, composed with the field,
                          and the field smoothed. The greedy_* knobs below only act in this mode and are left
                          out of to_json() otherwise (so the reports and benchmark cache keys of the Adam
                          presets are as before).
    greedy_step           longest update vector per iteration, in voxels of the level's working grid
                          (greedy -e, default 1.0; every iteration's update is scaled to exactly this length).
    greedy_sigma_pre      standard deviation, in working-grid voxels, of the Gaussian applied to the
                          similarity gradient before scaling ("fluid" smoothing; greedy -s first value, 1.732).
    greedy_sigma_post     standard deviation, in working-grid voxels, of the Gaussian applied to the
                          displacement after each update ("elastic" smoothing; greedy -s second value, 0.7071).
    greedy_lncc_eps       eps of the LNCC (losses.lncc, [0, 1]-intensity^4) in this mode; 1e-9 (losses.LNCC_EPS,
                          unbiased) is the nearest to greedy's NCC, whose floor is negligible for its images.

    deform_min_unit_mm    the unit v of the deformable stage's levels (deform_shrink, control_shrink) is the
                          target's smallest spacing, but at least this many mm (0: no floor). With 1.4 greedy's
                          levels 4, 2, 1 v run at 5.6, 2.8, 1.4 mm on a 0.7 mm knee (a 1 v level there costs ~8x
                          and gave worse per-atlas Dice than the 1.4 mm one) and as before on a 2 mm brain.
                          Left out of to_json() when 0, so the reports and cache keys of the other presets stay.

General
    seed                  torch seed (the algorithm has no random step; the seed pins anything that might).
    max_batch             atlases optimised together (memory grows with max_batch x working-grid size).
    label_method          "onehot" (the one method, kept as init is): each label's indicator interpolated
                          trilinearly, argmax.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..errors import MASRefineError

STAGES = ("affine", "deformable")
OPTIMIZERS = ("adam", "greedy")
#: ``eps`` of the registration's local NCC (:func:`MASRefineLib.losses.lncc`), added to the product of the
#: local variances. Refinement uses the unbiased 1e-9 (losses.LNCC_EPS); here 1e-5, which weights windows by
#: their contrast, stays by measurement: on 2 knee targets x 8 atlases 1e-9 lowered the majority-vote cartilage
#: Dice by 0.044 and 0.010 and doubled the folding (docs/registration.md, "The LNCC variance floor")
REGISTRATION_LNCC_EPS = 1e-5


@dataclass(frozen=True)
class RegistrationParams:
    stage: str = "deformable"
    # affine
    init: str = "moments"
    affine_shrink: tuple[float, ...] = (4.0, 2.5)
    affine_iterations: tuple[int, ...] = (60, 40)
    affine_lr: float = 0.5
    affine_similarity: str = "lncc"
    # deformable
    deform_shrink: tuple[float, ...] = (3.0, 2.0)
    control_shrink: tuple[float, ...] = (4.0, 3.0)
    # finest level 25 (until 2026-12-01: 40): -0.001..-0.006 majority-vote Dice for -12..-30 % CPU
    # (knee and IXI, docs/registration.md "Finest-level iterations")
    deform_iterations: tuple[int, ...] = (60, 25)
    deform_lr: tuple[float, ...] = (0.25, 0.15)
    similarity: str = "lncc"
    lncc_window: int = 5
    bending_weight: float = 0.03
    diffusion_weight: float = 0.2
    # 10 (until 2026-12-02: 0): folding 5-9x lower (knee 0.066 -> 0.008 %, IXI 0.028-0.136 -> 0.004-0.019 %),
    # majority-vote Dice within +-0.0004, +4 % CPU (docs/registration.md "The folding barrier")
    folding_weight: float = 10.0
    diffeomorphic: bool = False
    svf_steps: int = 6
    deform_optimizer: str = "adam"
    greedy_step: float = 1.0
    greedy_sigma_pre: float = 1.7320508076  # greedy's defaults (GreedyParameters.cxx default_sigma_pre/post)
    greedy_sigma_post: float = 0.7071067812
    greedy_lncc_eps: float = 1e-9
    deform_min_unit_mm: float = 0.0
    # general
    seed: int = 0
    max_batch: int = 16
    label_method: str = "onehot"

    def validate(self) -> "RegistrationParams":
        def bad(msg: str):
            raise MASRefineError(f"registration parameters: {msg}")
        if self.stage not in STAGES:
            bad(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.init != "moments" or self.label_method != "onehot":
            bad(f"init must be moments and label_method onehot, got {self.init!r} and {self.label_method!r}")
        for name in ("affine_similarity", "similarity"):
            if getattr(self, name) not in ("ncc", "lncc"):
                bad(f"{name} must be ncc or lncc, got {getattr(self, name)!r}")
        if len(self.affine_shrink) != len(self.affine_iterations):
            bad("affine_shrink and affine_iterations need one value per level each")
        n = len(self.deform_shrink)
        # the greedy optimiser uses neither a control grid nor Adam's step: only its iterations are per level
        per_level = ("deform_iterations",) if self.deform_optimizer == "greedy" else (
            "control_shrink", "deform_iterations", "deform_lr")
        for name in per_level:
            if len(getattr(self, name)) != n:
                bad(f"{name} needs one value per deformable level ({n}, as deform_shrink)")
        if any(s <= 0 for s in self.affine_shrink + self.deform_shrink + self.control_shrink):
            bad("shrink factors must be positive")
        if any(i < 0 for i in self.affine_iterations + self.deform_iterations):
            bad("iterations must be >= 0")
        if self.lncc_window < 3 or self.lncc_window % 2 == 0:
            bad("lncc_window must be an odd number of voxels >= 3")
        if self.max_batch < 1:
            bad("max_batch must be >= 1")
        if self.bending_weight < 0 or self.diffusion_weight < 0 or self.folding_weight < 0:
            bad("regularisation weights must be >= 0")
        if self.deform_optimizer not in OPTIMIZERS:
            bad(f"deform_optimizer must be one of {OPTIMIZERS}, got {self.deform_optimizer!r}")
        if self.deform_optimizer == "greedy" and self.diffeomorphic:
            bad("deform_optimizer greedy has no diffeomorphic (SVF) mode: set diffeomorphic false")
        if self.deform_min_unit_mm < 0:
            bad(f"deform_min_unit_mm must be >= 0, got {self.deform_min_unit_mm}")
        if self.greedy_step <= 0 or self.greedy_sigma_pre < 0 or self.greedy_sigma_post < 0 or self.greedy_lncc_eps < 0:
            bad("greedy_step must be > 0 and greedy_sigma_pre, greedy_sigma_post, greedy_lncc_eps >= 0")
        for f in fields(self):  # NaN passes every comparison above and would silently change the result
            v = getattr(self, f.name)
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
                bad(f"{f.name} must be finite, got {v!r}")
        return self

    def to_json(self) -> dict[str, Any]:
        """Every knob, except the greedy optimiser's when it is not selected: they do not change an Adam
        registration, and leaving them out keeps the Adam presets' reports and the benchmarks' cache keys
        (bench/datasets.params_digest) as they were before the greedy optimiser existed."""
        out = dataclasses.asdict(self)
        if self.deform_optimizer == "adam":
            for key in [k for k in out if k.startswith("greedy_") or k == "deform_optimizer"]:
                del out[key]
        if self.deform_min_unit_mm == 0:
            del out["deform_min_unit_mm"]
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> "RegistrationParams":
        """A copy with some knobs changed; values may be strings as typed on a command line
        (tuples as ``8,4``; booleans as true/false)."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for key, value in overrides.items():
            key = key.replace("-", "_")
            if key not in known:
                raise MASRefineError(f"unknown registration parameter {key!r} (known: {', '.join(known)})")
            changes[key] = _coerce(key, value, getattr(self, key))
        return replace(self, **changes).validate()


def _coerce(key: str, value: Any, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            typ = type(current[0]) if current else float
            return tuple(typ(float(v)) if typ is int else typ(v) for v in items)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise MASRefineError(f"registration parameter {key}: cannot use value {value!r}") from None


DEFAULT = RegistrationParams()

#: The presets. ``default`` is the tuned setting (evidence in docs/registration.md); ``fast`` (interactive
#: use) has one affine level and a coarse-to-mid deformable part; ``accurate`` adds a finer level and more
#: iterations; ``greedy`` is the greedy tool's deformable algorithm and parameters on our affine (a benchmark arm).
PRESETS: dict[str, RegistrationParams] = {
    # fast: one affine level; the deformable part starts on a coarse 6 / 8 v level that takes up large
    # (articulated) knee misalignments the affine leaves; such large steps fold (0.46 % of knee voxels)
    # unless the field is a diffeomorphism (SVF), which removes folding for +45 % time
    "fast": replace(DEFAULT, affine_shrink=(4.0,), affine_iterations=(60,),
                    deform_shrink=(6.0, 3.0), control_shrink=(8.0, 4.0), deform_iterations=(80, 40),
                    deform_lr=(0.3, 0.2), diffeomorphic=True, folding_weight=0.0),  # SVF: nothing to fold
    "default": DEFAULT,
    "accurate": replace(DEFAULT, affine_iterations=(80, 60), deform_shrink=(3.0, 2.0, 1.5),
                        control_shrink=(4.0, 3.0, 2.0), deform_iterations=(80, 60, 30), deform_lr=(0.25, 0.15, 0.1)),
    # greedy: our affine (as default), then the greedy tool's deformable algorithm with its documented MRI
    # parameters (bench/peers.py GREEDY: -m NCC 2x2x2 -n 100x50x10 -s 1.732vox 0.7071vox, -e 1.0 by default):
    # levels 4, 2, 1 v (greedy's pyramid factors 4x, 2x, 1x of the target's voxels), NCC radius 2 = a 5-voxel
    # window; levels counted from at least 1.4 mm (deform_min_unit_mm: 8, 4, 2 voxels of a 0.7 mm knee, chosen on a
    # knee tuning target; unchanged on 2 mm brains); otherwise not tuned (docs/registration.md "greedy-style optimiser")
    "greedy": replace(DEFAULT, deform_optimizer="greedy", deform_shrink=(4.0, 2.0, 1.0), control_shrink=(4.0, 2.0, 1.0),
                      deform_iterations=(100, 50, 10), deform_lr=(1.0, 1.0, 1.0), lncc_window=5, greedy_step=1.0,
                      greedy_sigma_pre=1.7320508076, greedy_sigma_post=0.7071067812, greedy_lncc_eps=1e-9,
                      bending_weight=0.0, diffusion_weight=0.0, folding_weight=0.0, deform_min_unit_mm=1.4),
}


def get_params(preset: str | RegistrationParams = "default", **overrides: Any) -> RegistrationParams:
    """A preset by name (or a given params object) with optional overrides, validated."""
    if isinstance(preset, RegistrationParams):
        base = preset
    else:
        if preset not in PRESETS:
            raise MASRefineError(f"unknown registration preset {preset!r} (choose {', '.join(PRESETS)})")
        base = PRESETS[preset]
    return base.with_overrides(overrides) if overrides else base.validate()

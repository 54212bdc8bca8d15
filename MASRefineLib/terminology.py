"""Standard terminology of segments (SNOMED CT codes), in the form 3D Slicer stores with each segment.

A label's terminology is one Slicer *TerminologyEntry* string (Slicer's segmentation developer guide,
"TerminologyEntry tag"; parsed by ``vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry``)::

    <context name>~<category>~<type>~<type modifier>~<anatomic context name>~<anatomic region>~<region modifier>

where each coded component is ``scheme^value^meaning`` (``^^`` when unset), e.g. the left hippocampus::

    Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^5366008^Hippocampus~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^

It travels in the label table (``"terminology"`` per label in atlas.json or a JSON label table, a ``Terminology``
column in a CSV label table, or ``terminology.json`` ``{value: entry}`` in the atlas-set folder) into every
``.seg.nrrd`` MASRefine writes (the segment's ``TerminologyEntry`` tag, through slicerio), which Slicer shows.

Built-in codes (:data:`KNOWN`), given to labels whose name is exactly one of these when an atlas set is built
(``atlas init``) and the label table has no terminology of its own:

- knee: femur, tibia, patella (bones) and femoral, tibial, patellar cartilage (tissue *Cartilage* with the bone as
  anatomic region); the names of the built-in phantom, of ``synth_knee``'s labels.json and of OAI-ZIB;
- brain: the MUSE (IXI DLMUSE, ``MUSE_listROIs.csv``) names of the subcortical structures and ventricles with a code
  of their own in Slicer's DICOM master list: hippocampus, amygdala, caudate, putamen, pallidum (globus pallidus),
  thalamus, accumbens area (nucleus accumbens), lateral ventricle (right and left), third and fourth ventricle,
  brain stem. Cortical parcels (gyri), white-matter regions, the cerebellum's parts and composite ROIs get no code:
  MUSE's parcels do not match one SNOMED concept each, and a wrong code is worse than none.

Codes and meanings are those of Slicer's ``SegmentationCategoryTypeModifier-DICOM-Master.json`` and
``AnatomicRegionAndModifier-DICOM-Master.json`` (Modules/Loadable/Terminologies/Resources, v5.10.0), except the tibia
(SCT 12611008 "Tibia", absent there), taken from the TotalSegmentator extension's
``totalsegmentator_snomed_mapping.csv`` (lassoan/SlicerTotalSegmentator 6a82370).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MASRefineError

DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_JSON = "terminology.json"

Code = tuple[str, str, str]  # (coding scheme, code value, code meaning)
ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
TISSUE: Code = ("SCT", "85756007", "Tissue")
CARTILAGE: Code = ("SCT", "309312004", "Cartilage")
FEMUR: Code = ("SCT", "71341001", "Femur")
TIBIA: Code = ("SCT", "12611008", "Tibia")
PATELLA: Code = ("SCT", "64234005", "Patella")
RIGHT: Code = ("SCT", "24028007", "Right")
LEFT: Code = ("SCT", "7771000", "Left")
_EMPTY = "^^"


def entry(category: Code, type_: Code, modifier: Code | None = None, region: Code | None = None,
          region_modifier: Code | None = None) -> str:
    """A TerminologyEntry string of the DICOM master lists from codes."""
    def code(c):
        return "^".join(c) if c else _EMPTY
    return "~".join([DICOM_CONTEXT, code(category), code(type_), code(modifier), ANATOMIC_CONTEXT, code(region),
                     code(region_modifier if region else None)])


def _structure(code_value: str, meaning: str, modifier: Code | None = None) -> str:
    return entry(ANATOMICAL_STRUCTURE, ("SCT", code_value, meaning), modifier)


def _cartilage(bone: Code) -> str:
    return entry(TISSUE, CARTILAGE, region=bone)


KNEE: dict[str, str] = {
    "femur": entry(ANATOMICAL_STRUCTURE, FEMUR), "tibia": entry(ANATOMICAL_STRUCTURE, TIBIA),
    "patella": entry(ANATOMICAL_STRUCTURE, PATELLA),
    "femoral cartilage": _cartilage(FEMUR), "tibial cartilage": _cartilage(TIBIA),
    "patellar cartilage": _cartilage(PATELLA),
}

# MUSE ROI name stem -> (SNOMED CT code, meaning, paired); _R / _L give the laterality modifier
_MUSE_STRUCTURES = {
    "Hippocampus": ("5366008", "Hippocampus", True), "Amygdala": ("4958002", "Amygdala", True),
    "Caudate": ("11000004", "Caudate nucleus", True), "Putamen": ("89278009", "Putamen", True),
    "Pallidum": ("14738005", "Globus pallidus", True), "ThalamusProper": ("42695009", "Thalamus", True),
    "AccumbensArea": ("427667007", "Nucleus accumbens", True), "LateralVentricle": ("66720007", "Lateral ventricle", True),
    "3rdVentricle": ("49841001", "Third ventricle", False), "4thVentricle": ("35918002", "Fourth ventricle", False),
    "BrainStem": ("119238007", "Brain stem", False),
}
MUSE: dict[str, str] = {}
for _stem, (_value, _meaning, _paired) in _MUSE_STRUCTURES.items():
    if _paired:
        MUSE[f"{_stem}_R"] = _structure(_value, _meaning, RIGHT)
        MUSE[f"{_stem}_L"] = _structure(_value, _meaning, LEFT)
    else:
        MUSE[_stem] = _structure(_value, _meaning)

#: label name -> TerminologyEntry, for the names MASRefine codes itself (exact names; knee names in any case)
KNOWN: dict[str, str] = {**KNEE, **MUSE}


def for_name(name: str) -> str | None:
    """The built-in terminology of a label name, or None (never a guess: exact names of :data:`KNOWN`; the knee
    names also capitalised or with ``_`` for spaces)."""
    if name in MUSE:
        return MUSE[name]
    return KNEE.get(" ".join(name.replace("_", " ").lower().split()))


def parse(text, source: str = "terminology") -> str:
    """Check a TerminologyEntry string as Slicer reads it (7 components, coded ones ``scheme^value^meaning``, category
    and type required) and return it; a bad one is one :class:`MASRefineError` line naming ``source``."""
    if not isinstance(text, str):
        raise MASRefineError(f"{source}: a terminology must be a Slicer TerminologyEntry string, got {text!r}")
    if any(c in text for c in "|\r\n\t") or len(text) > 1000:
        raise MASRefineError(f"{source}: a terminology is one line without '|' (the .seg.nrrd tag separator), at most "
                             "1000 characters")
    parts = text.split("~")
    if len(parts) != 7:
        raise MASRefineError(f"{source}: a terminology has 7 '~'-separated components (context~category~type~"
                             f"modifier~anatomic context~region~region modifier), got {len(parts)}")
    for i, what in ((1, "category"), (2, "type"), (3, "type modifier"), (5, "anatomic region"), (6, "region modifier")):
        fields = parts[i].split("^")
        unset = parts[i] in ("", _EMPTY)
        if (i in (1, 2) and unset) or (not unset and (len(fields) != 3 or not all(f.strip() for f in fields))):
            raise MASRefineError(f"{source}: the terminology's {what} must be 'scheme^value^meaning'"
                                 f"{'' if i in (1, 2) else ' or ^^'}, got {parts[i]!r}")
    return text


def to_slicerio(text: str) -> dict:
    """The terminology as slicerio's segment ``terminology`` dict (``contextName``, ``category``, ``type``, ...)."""
    import slicerio.segmentation as seg
    return seg.terminology_entry_from_string(text)


def from_slicerio(d: dict) -> str:
    import slicerio.segmentation as seg
    return seg.terminology_entry_to_string(d)


def load_file(path: str | os.PathLike) -> dict[int, str]:
    """``terminology.json``: ``{label value: TerminologyEntry}``; one line naming the file for anything else."""
    from .jsonio import read_json

    path = Path(path)
    d = read_json(path, TERMINOLOGY_JSON)
    if not isinstance(d, dict):
        raise MASRefineError(f"{path}: must hold an object {{label value: Slicer TerminologyEntry string}}")
    out = {}
    for k, v in d.items():
        try:
            value = int(str(k).strip())
        except ValueError:
            raise MASRefineError(f"{path}: label value {k!r} is not an integer") from None
        out[value] = parse(v, f"{path}, label {value}")
    return out

"""Which greedy affine initialisation is sane on knees (a peer check, on tuning subjects only): the affine stage
alone, then per-atlas bones / cartilage / mean Dice of the warped labels. Knee images come from bench/datasets.py's
synthesis in .cache/knee. Usage: greedy_init.py TARGET ATLAS1,ATLAS2 "INIT1;INIT2". Its output for the knee tuning
target is docs/results/greedy-init.txt; the chosen initialisation is bench/peers.py's GREEDY."""
import os
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
from picsl_greedy import Greedy3D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import GREEDY  # noqa: E402  (the peer's affine and label parameters, as the yardstick runs them)
from pipeline import GROUPS  # noqa: E402  (the yardstick's label groups)
from scoring import dice_per_label, summarize  # noqa: E402  (the yardstick's per-atlas Dice)

K = Path(__file__).resolve().parents[1] / ".cache" / "knee"
tgt, atl = sys.argv[1], sys.argv[2].split(",")
inits = sys.argv[3].split(";")
fixed = sitk.ReadImage(f"{K}/images/{tgt}.nii.gz", sitk.sitkFloat32)
tl = sitk.GetArrayFromImage(sitk.ReadImage(f"{K}/labels/{tgt}.nii.gz"))
sink = open(os.devnull, "w")
tmp = tempfile.mkdtemp(prefix="greedy-init-")
for a in atl:
    mov = sitk.ReadImage(f"{K}/images/{a}.nii.gz", sitk.sitkFloat32)
    lab = sitk.ReadImage(f"{K}/labels/{a}.nii.gz")
    for init in inits:
        g = Greedy3D(); t = time.time()
        if init.startswith("-moments"):
            g.execute(f"-d 3 -threads 1 -i fix mov {init} -o mom", out=sink, err=sink, fix=fixed, mov=mov, mom=None)
            ia = "-ia mom"
        else:
            ia = init
        g.execute(f"-d 3 -threads 1 -i fix mov {GREEDY['affine']} {ia} -o aff", out=sink, err=sink, fix=fixed, mov=mov, aff=None)
        wl_path = os.path.join(tmp, f"{a}.nii.gz")
        g.execute(f"-d 3 -threads 1 -rf fix -ri {GREEDY['label_interp']} -rm lab {wl_path} -r aff", out=sink, err=sink, fix=fixed, lab=lab)
        wl = sitk.GetArrayFromImage(sitk.ReadImage(wl_path))
        d = summarize(dice_per_label(wl, tl), GROUPS["knee"], "mean")
        print(f"{a:20s} {init:28s} bones {d['bones']:.3f} cart {d['cartilages']:.3f}  all {d['mean']:.3f} "
              f"{time.time() - t:.0f}s", flush=True)

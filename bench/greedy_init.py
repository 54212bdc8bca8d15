"""Which greedy affine initialisation is sane on knees (a peer check, on tuning subjects only): the affine stage
alone, then per-atlas bones / cartilage / mean Dice of the warped labels. Knee images come from bench/datasets.py's
synthesis in .cache/knee. Usage: greedy_init.py TARGET ATLAS1,ATLAS2 "INIT1;INIT2". Its output for the knee tuning
target is docs/results/greedy-init.txt; the chosen initialisation is bench/peers.py's GREEDY."""
import sys, time, numpy as np, SimpleITK as sitk
from picsl_greedy import Greedy3D
import os
K = str(__import__("pathlib").Path(__file__).resolve().parents[1] / ".cache" / "knee")
tgt, atl = sys.argv[1], sys.argv[2].split(",")
inits = sys.argv[3].split(";")
fixed = sitk.ReadImage(f"{K}/images/{tgt}.nii.gz", sitk.sitkFloat32)
tl = sitk.GetArrayFromImage(sitk.ReadImage(f"{K}/labels/{tgt}.nii.gz"))
def dice(a, b, vals):
    a, b = np.isin(a, vals), np.isin(b, vals); return 2 * (a & b).sum() / max(1, a.sum() + b.sum())
sink = open(os.devnull, "w")
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
        g.execute(f"-d 3 -threads 1 -i fix mov -a -dof 12 -m NCC 2x2x2 -n 100x50x10 {ia} -o aff", out=sink, err=sink, fix=fixed, mov=mov, aff=None)
        g.execute(f"-d 3 -threads 1 -rf fix -ri LABEL 0.2vox -rm lab /tmp/gd_{a}.nii.gz -r aff", out=sink, err=sink, fix=fixed, lab=lab)
        wl = sitk.GetArrayFromImage(sitk.ReadImage(f"/tmp/gd_{a}.nii.gz"))
        vals = [v for v in np.unique(tl) if v]
        print(f"{a:20s} {init:28s} bones {dice(wl, tl, [1,3]):.3f} cart {dice(wl, tl, [2,4]):.3f}  all {np.mean([dice(wl,tl,[v]) for v in vals]):.3f} {time.time()-t:.0f}s", flush=True)

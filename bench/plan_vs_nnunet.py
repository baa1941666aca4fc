"""Our plan (nny_models.planning) beside nnU-Net v2's own planner on the same phantom data.

nnU-Net v2 is never a project dependency: it lives in its own virtual environment, e.g.

    python3 -m venv /tmp/nnunet-venv && /tmp/nnunet-venv/bin/pip install torch==2.13.0
    /tmp/nnunet-venv/bin/pip install nnunetv2 -c constraints.txt      # constraints.txt: torch==2.13.0

and this script calls its command-line tools (nnUNetv2_extract_fingerprint, nnUNetv2_plan_experiment) by path.
The phantoms are copied into nnU-Net's raw layout (DatasetXXX/imagesTr/{case}_0000.nii.gz, labelsTr/, dataset.json).
nnU-Net reads arrays with SimpleITK ((z, y, x) order) and may transpose them (transpose_forward); its spacing and
patch size are mapped back to RAS (x, y, z) here so that the two plans line up axis by axis.

    python bench/plan_vs_nnunet.py [--cases 8] [--seed 0] [--data_dir DIR] [--nnunet_bin /tmp/nnunet-venv/bin]

Prints one JSON object: both plans side by side, and the ratio ours / nnU-Net of each number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nny_models.io import discover_cases  # noqa: E402
from nny_models.planning import plan_dataset  # noqa: E402

DATASET_ID = 913


def label_map(data_dir: Path) -> dict[str, int]:
    """{label name: value} for nnU-Net's dataset.json, from the data's MSD dataset.json (or background/foreground)."""
    meta = json.loads((data_dir / "dataset.json").read_text()) if (data_dir / "dataset.json").is_file() else {}
    names = meta.get("labels") or {"0": "background", "1": "foreground"}
    return {v: int(k) for k, v in names.items()} if all(str(k).isdigit() for k in names) else dict(names)


def ras_axes(transpose_forward: list[int]) -> list[int]:
    """World (RAS, x y z) axis of each nnU-Net plan axis: plan axis k = SimpleITK array axis transpose_forward[k],
    and SimpleITK array axis a = world axis 2 - a (SimpleITK arrays are z, y, x)."""
    return [2 - transpose_forward[k] for k in range(3)]


def to_nnunet_raw(data_dir: Path, raw: Path, labels: dict[str, int]) -> Path:
    records = [r for r in discover_cases(data_dir) if r.label is not None]
    ds = raw / f"Dataset{DATASET_ID:03d}_Phantoms"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for r in records:
        if not r.image.endswith(".nii.gz") or not r.label.endswith(".nii.gz"):
            raise ValueError(f"{r.image}: this benchmark copies .nii.gz cases only")
        shutil.copy(r.image, ds / "imagesTr" / f"{r.case_id}_0000.nii.gz")
        shutil.copy(r.label, ds / "labelsTr" / f"{r.case_id}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(records), "file_ending": ".nii.gz"}
    (ds / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ds


def nnunet_plan(data_dir: Path, work: Path, nnunet_bin: Path, labels: dict[str, int]) -> dict:
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), OMP_NUM_THREADS="1")
    to_nnunet_raw(data_dir, work / "raw", labels)
    for tool in ("nnUNetv2_extract_fingerprint", "nnUNetv2_plan_experiment"):
        args = [str(nnunet_bin / tool), "-d", str(DATASET_ID)] + (["-np", "1"] if "fingerprint" in tool else [])
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    pre = work / "preprocessed" / f"Dataset{DATASET_ID:03d}_Phantoms"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    fp = json.loads((pre / "dataset_fingerprint.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    tf = plans["transpose_forward"]
    ras = ras_axes(tf)

    def to_ras(v):
        out = [0] * 3
        for k, axis in enumerate(ras):
            out[axis] = v[k]
        return out

    st = fp["foreground_intensity_properties_per_channel"]["0"]
    return {
        "spacing": to_ras(cfg["spacing"]), "patch_size": to_ras(cfg["patch_size"]), "batch_size": cfg["batch_size"],
        "median_shape": to_ras(cfg["median_image_size_in_voxels"]),
        "normalization": {"scheme": cfg["normalization_schemes"][0], "clip_low": st["percentile_00_5"],
                          "clip_high": st["percentile_99_5"], "mean": st["mean"], "std": st["std"]},
        "gpu_memory_target_gb": plans.get("configurations", {}).get("3d_fullres", {}).get("gpu_memory_target_in_gb"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", help="labelled .nii.gz data (MSD layout); default: phantoms generated here")
    ap.add_argument("--cases", type=int, default=8, help="phantoms generated when --data_dir is not given")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nnunet_bin", default="/tmp/nnunet-venv/bin", help="bin/ of the venv holding nnunetv2")
    ap.add_argument("--memory_budget_voxels", type=int, default=2 * 128**3,
                    help="our budget (nnU-Net's default 3d_fullres is sized for a ~8 GB GPU)")
    args = ap.parse_args(argv)
    nnunet_bin = Path(args.nnunet_bin)
    if not (nnunet_bin / "nnUNetv2_plan_experiment").is_file():
        raise SystemExit(f"{nnunet_bin}/nnUNetv2_plan_experiment not found: install nnunetv2 in its own venv "
                         "(see this script's docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else None
        if data is None:
            from nny_models.phantoms import write_dataset

            data = write_dataset(work / "phantoms", cases=args.cases, seed=args.seed, workers=2)
        labels = label_map(data)
        peer = nnunet_plan(data, work, nnunet_bin, labels)
        plan = plan_dataset(data, memory_budget_voxels=args.memory_budget_voxels)
    ours = {
        "spacing": list(plan.spacing), "patch_size": list(plan.patch_size), "batch_size": plan.batch_size,
        "median_shape": list(plan.median_shape),
        "normalization": {k: v for k, v in plan.normalization.to_dict().items() if k != "foreground"},
        "anisotropic": plan.anisotropic,
    }
    ratio = {k: [a / b if b else None for a, b in zip(ours[k], peer[k])]
             for k in ("spacing", "patch_size", "median_shape")}
    ratio.update({k: ours["normalization"][k] / peer["normalization"][k]
                  for k in ("clip_low", "clip_high", "mean", "std") if peer["normalization"][k]})
    ratio["batch_size"] = ours["batch_size"] / peer["batch_size"]
    print(json.dumps({"bench": "plan_vs_nnunet", "cases": plan.fingerprint["num_cases"], "ours": ours,
                      "nnunet": peer, "ratio_ours_over_nnunet": ratio}, indent=2))


if __name__ == "__main__":
    main()

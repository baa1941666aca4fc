"""``nnynet-predict``: segment one CT with a saved or published NnyNet and write the mask as NIfTI.

    nnynet-predict --model org/nnynet --input ct.nii.gz --output mask.nii.gz [--clinical row.json]

Any bad input (not a CT, a 2D image, a corrupt file, absent clinical columns, a model folder
without model.safetensors) ends with one "error: ..." line on stderr and exit code 2, never a
traceback and never a mask written from a wrong input. --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """A problem with what the user passed (exit code 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nnynet-predict", description="Segment a CT volume with an NnyNet model.")
    p.add_argument("--model", required=True, help="local save_pretrained folder or Hub repo id")
    p.add_argument("--input", required=True, help="CT volume: .nii/.nii.gz/.nrrd or a DICOM folder")
    p.add_argument("--output", required=True, help="where to write the uint8 label mask (.nii.gz)")
    p.add_argument("--clinical", help="one clinical row: .json object or one-row .csv")
    p.add_argument("--allow-missing-clinical", action="store_true",
                   help="impute clinical columns absent from --clinical instead of stopping")
    p.add_argument("--probabilities", help="also write softmax probabilities (float32, X,Y,Z,C) here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if not 0.0 <= args.overlap < 1.0:
        p.error(f"--overlap must be in [0, 1), got {args.overlap}")
    return args


def check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")


def load_model(model: str, revision: str | None = None):
    """NnyNet.from_pretrained(strict=True), with the common mistakes turned into InputError."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {model!r}: expected a model folder (save_pretrained output), got a file")
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            raise InputError(f"--model {model!r}: folder lacks {', '.join(missing)} (expected save_pretrained output)")
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1:  # a path, not an "org/name" repo id
        raise InputError(f"--model {model!r}: no such folder")
    from nny_models.hub import NnyNet

    try:
        return NnyNet.from_pretrained(model, revision=revision, strict=True)
    except Exception as err:  # hub / safetensors / shape errors: all mean "this is not a usable model"
        raise InputError(f"--model {model!r}: cannot load the model: {_one_line(err)}") from err


def load_input(path: str):
    """(volume, affine) of the input CT; unreadable files become InputError."""
    from nny_models.io import load_volume

    if not Path(path).exists():
        raise InputError(f"--input {path!r} does not exist")
    try:
        volume, affine = load_volume(path)
    except Exception as err:  # nibabel/gzip/pydicom raise many types for a corrupt or foreign file
        raise InputError(f"--input {path!r}: cannot read the volume: {_one_line(err)}") from err
    return volume, affine


def run(args: argparse.Namespace) -> None:
    import nibabel as nib
    import numpy as np

    from nny_models.inference import check_ct_volume, missing_clinical_columns, predict, read_clinical

    start = time.perf_counter()
    check_device(args.device)
    model = load_model(args.model, args.revision)
    volume, affine = load_input(args.input)
    try:
        check_ct_volume(np.asarray(volume), f"--input {args.input!r}")
    except ValueError as err:
        raise InputError(str(err)) from err

    clinical = None
    if args.clinical is not None:
        try:
            clinical = read_clinical(args.clinical)
        except ValueError as err:
            raise InputError(f"--clinical: {err}") from err
        if isinstance(clinical, dict):
            missing = missing_clinical_columns(model.config.clinical_schema, clinical)
            if missing and not args.allow_missing_clinical:
                raise InputError(
                    f"--clinical {args.clinical!r} lacks column(s) {missing} expected by the model "
                    "(add them, empty values are imputed, or pass --allow-missing-clinical)"
                )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = predict(
                model, volume, clinical=clinical, affine=affine, overlap=args.overlap,
                sw_batch_size=args.sw_batch_size, device=args.device,
                return_probabilities=args.probabilities is not None,
            )
        except ValueError as err:
            raise InputError(str(err)) from err
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    mask, probs = out if isinstance(out, tuple) else (out, None)

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), args.output)
    if probs is not None:
        Path(args.probabilities).parent.mkdir(parents=True, exist_ok=True)
        # NIfTI keeps the three spatial axes first: (X, Y, Z, C)
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), affine), args.probabilities)

    names = list(model.config.label_names)
    counts = np.bincount(mask.ravel(), minlength=len(names))
    print(f"wrote {args.output}  shape {tuple(mask.shape)}  in {time.perf_counter() - start:.1f} s")
    for label, count in enumerate(counts):
        name = names[label] if label < len(names) else f"label_{label}"
        print(f"  {label} {name:<12} {int(count):>10} voxels")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as err:
        if args.debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (rerun with --debug)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

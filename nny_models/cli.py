"""``nnynet-predict``: segment one CT with a saved or published NnyNet and write the mask as NIfTI.

    nnynet-predict --model org/nnynet --input ct.nii.gz --output mask.nii.gz [--clinical row.json]

Any bad input (not a CT, a 2D image, a corrupt file, absent clinical columns, a model folder
without model.safetensors, an output path that would overwrite an input) ends with one
"nnynet-predict: error: ..." line on stderr and exit code 2 (1 for an internal error), never a
traceback and never a mask written from a wrong input. --debug shows the traceback instead.

Output paths are checked before any work: --output and --probabilities must end in .nii.gz or .nii
(or name an existing folder, which receives <input name>_mask.nii.gz / _probabilities.nii.gz), must
differ from each other and from every input file, and their folder must be writable. "~" is expanded in
every path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from nny_models.paths import same_file

EXIT_BAD_INPUT = 2
PROG = "nnynet-predict"
OUTPUT_SUFFIXES = (".nii.gz", ".nii")  # what nibabel writes as NIfTI


class InputError(Exception):
    """A problem with what the user passed (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the CLI (no usage block)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Segment a CT volume with an NnyNet model.")
    p.add_argument("--model", required=True, action="append",
                   help="local save_pretrained folder or Hub repo id, or an ensemble folder / repo written by "
                        "nny_models.save_ensemble; repeat it for an ensemble (e.g. the k fold models): their "
                        "probabilities are averaged (nny_models.ensemble)")
    p.add_argument("--input", required=True, help="CT volume: .nii/.nii.gz/.nrrd or a DICOM folder")
    p.add_argument("--output", required=True, help="where to write the uint8 label mask (.nii.gz)")
    p.add_argument("--clinical", help="one clinical row: .json object or one-row .csv")
    p.add_argument("--allow-missing-clinical", action="store_true",
                   help="impute clinical columns absent from --clinical instead of stopping")
    p.add_argument("--probabilities", help="also write softmax probabilities (float32, X,Y,Z,C) here")
    p.add_argument("--attention", help="also write the clinical query's attention map over the bottleneck, "
                   "upsampled to the input grid (float32, 1 = uniform; cross-attention models only)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 0.9]")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (see bench/RESULTS.md, profile_predict)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation (2^k passes per window, k mirrored axes): --tta on, --no-tta "
                        "off; default: as the model's config.json says (tta_mirror_axes, the axes it was trained "
                        "mirrored on; none for a model trained without flips, where --tta is an error)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: run the network exported by nnynet-export (MODEL/model.onnx or --onnx; fp32)")
    p.add_argument("--onnx", default=None, help="the .onnx file for --backend onnxruntime (default: MODEL/model.onnx)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--keep-all-lesions", action="store_true",
                   help="skip config.json's lesion_in_organ step: keep tumor components that barely touch the liver "
                        "(for exophytic tumors, or a CT whose liver comes out poorly; see the README's false-alarm "
                        "section for what the step costs and saves)")
    p.add_argument("--force", action="store_true",
                   help="run even if the input does not look like a CT in HU (prints a warning; check the mask)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    from nny_models.inference import check_overlap

    try:
        check_overlap(args.overlap, "--overlap")
    except ValueError as err:
        p.error(str(err))
    if args.sw_batch_size < 1:
        p.error(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.backend == "onnxruntime" and (args.precision == "bf16" or args.attention is not None):
        p.error("--backend onnxruntime runs fp32 and has no attention maps: drop --precision bf16 / --attention")
    if args.onnx is not None and args.backend != "onnxruntime":
        p.error("--onnx needs --backend onnxruntime")
    return args


def _expand(path: str | list[str] | None) -> str | list[str] | None:
    if isinstance(path, list):  # --model repeated for an ensemble
        return [os.path.expanduser(p) for p in path]
    return None if path is None else os.path.expanduser(path)


def _output_file(flag: str, value: str, stem: str, suffix: str) -> Path:
    """The file a --output / --probabilities value names: a .nii(.gz) path, or <folder>/<stem><suffix>."""
    path = Path(value)
    if path.is_dir() or value.endswith((os.sep, "/")):
        return path / f"{stem}{suffix}"
    if not path.name.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(
            f"{flag} {value!r}: unsupported file type; expected a name ending in {' or '.join(OUTPUT_SUFFIXES)} "
            "(NIfTI) or an existing folder"
        )
    return path


def _check_writable(flag: str, path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder; expected a file name ending in .nii.gz")
    parent = path.parent
    while not parent.exists():  # the folders mkdir(parents=True) will create
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {str(path)!r}: not writable")


def check_paths(args: argparse.Namespace) -> None:
    """Expand "~" everywhere and validate the outputs before any work; args.output/.probabilities become files.

    Refused: a missing --input; an output that is, or is inside the DICOM folder of, an input file
    (--input, --clinical, the model folder's files); --probabilities equal to --output; an unsupported
    extension; an output whose folder cannot be written.
    """
    from nny_models.io import _is_dicom_dir, _strip_suffix

    for key in ("input", "output", "probabilities", "attention", "clinical", "model", "onnx"):
        if hasattr(args, key):
            setattr(args, key, _expand(getattr(args, key)))
    source = Path(args.input)
    if not source.exists():
        raise InputError(f"--input {args.input!r}: not found")
    if source.is_dir() and not _is_dicom_dir(source):
        raise InputError(f"--input {args.input!r}: a folder without DICOM files (.dcm or files with the DICM "
                         "preamble); expected a DICOM series folder or a .nii, .nii.gz or .nrrd file")
    # the name as given (a symlink's own, as the clinical row's case id is matched), ".." resolved lexically
    stem = _strip_suffix(Path(os.path.abspath(source)).name) or "input"
    outputs = {"--output": _output_file("--output", args.output, stem, "_mask.nii.gz")}
    if args.probabilities is not None:
        outputs["--probabilities"] = _output_file("--probabilities", args.probabilities, stem, "_probabilities.nii.gz")
    if args.attention is not None:
        outputs["--attention"] = _output_file("--attention", args.attention, stem, "_attention.nii.gz")
        if same_file(outputs["--attention"], outputs["--output"]):
            raise InputError(f"--attention {str(outputs['--attention'])!r} is the same file as --output")

    inputs = {"--input": source}
    if args.clinical is not None:
        inputs["--clinical"] = Path(args.clinical)
    if getattr(args, "onnx", None) is not None:
        inputs["--onnx"] = Path(args.onnx)
    for model in args.model:
        if Path(model).expanduser().is_dir():
            model_files = ("config.json", "model.safetensors", "model.onnx", "README.md")
            inputs.update({f"--model {model}/{f}": Path(model).expanduser() / f for f in model_files})
    for flag, out in outputs.items():
        for what, path in inputs.items():
            if same_file(out, path):
                raise InputError(f"{flag} {str(out)!r} is the same file as {what} {str(path)!r}; refusing to overwrite an input")
        if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
            raise InputError(f"{flag} {str(out)!r} is inside the --input folder {str(source)!r}; write it elsewhere")
        _check_writable(flag, out)
        if out.exists() and Path(getattr(args, flag.lstrip("-"))).is_dir():  # a name we derived, not one given
            print(f"warning: {flag} {str(out)!r} exists and will be replaced (the name comes from --input's; "
                  "give a file name to keep both)", file=sys.stderr)
    flags = list(outputs)
    for i, first in enumerate(flags):  # no output may replace another
        for other in flags[i + 1 :]:
            if same_file(outputs[other], outputs[first]):
                raise InputError(f"{other} {str(outputs[other])!r} is the same file as {first}"
                                 + ("; it would replace the mask" if first == "--output" else ""))
    args.output = str(outputs["--output"])
    if args.probabilities is not None:
        args.probabilities = str(outputs["--probabilities"])
    if args.attention is not None:
        args.attention = str(outputs["--attention"])


def _save_nifti(array, affine, path: str) -> None:
    """Write aside, then rename: an interrupted run never leaves a half-written mask under the final name."""
    import nibabel as nib

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if final.name.lower().endswith(".nii.gz") else ".nii"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def check_device(device: str | None) -> None:
    """--device as nny_models.inference.check_device checks it (a device this machine can run), as an InputError."""
    from nny_models.inference import check_device as check

    if device is None:
        return
    try:
        check(device, "--device")
    except ValueError as err:
        raise InputError(str(err).replace("(use cpu)", "(use --device cpu)")) from None


def load_model(model: str, revision: str | None = None):
    """nny_models.load_model (an NnyNet, or an Ensemble for a save_ensemble folder; strict), with the common
    mistakes turned into InputError."""
    import json

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {model!r}: expected a model folder (save_pretrained output), got a file")
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        data = None
        if "config.json" not in missing:
            try:  # name the file: a JSON error alone says neither which file nor which model
                data = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"--model {model!r}: {path / 'config.json'} is not valid JSON: "
                                 f"{_one_line(err)}") from err
        if isinstance(data, dict) and "ensemble" in data:  # save_ensemble: the weights are in member folders
            missing.remove("model.safetensors")
        if missing:
            raise InputError(f"--model {model!r}: folder lacks {', '.join(missing)} (expected save_pretrained output)")
    elif _is_local_path(model):  # a path, not an "org/name" Hub repo id
        raise InputError(f"--model {model!r}: no such folder ({path.absolute()} not found)")
    from nny_models.ensemble import load_model as load_saved  # an NnyNet, or an Ensemble as config.json says

    try:
        return load_saved(model, revision=revision)
    except Exception as err:  # hub / safetensors / shape errors: all mean "this is not a usable model"
        raise InputError(f"--model {model!r}: cannot load the model: {_one_line(err)}") from err


def load_onnx_backend(model: str, onnx: str | None):
    """The ONNX Runtime network of a local model folder (config.json + model.onnx, or --onnx)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise InputError(f"--model {model!r}: --backend onnxruntime needs a local model folder with config.json")
    from nny_models.export import load_onnx_network

    try:
        return load_onnx_network(path, None if onnx is None else Path(onnx).expanduser())
    except (ImportError, ValueError) as err:
        raise InputError(f"--backend onnxruntime: {_one_line(err)}") from err


def _is_local_path(name: str) -> bool:
    """A Hub repo id is "name" or "namespace/name"; "./x", "/x", "~/x", "a/b/c", or "a/b" where folder a exists
    here are local paths, so a missing one is "not found" and never sent to the Hub as a repo id."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def load_input(path: str):
    """(volume, affine) of the input CT; unreadable files become InputError."""
    from nny_models.io import load_volume

    if not Path(path).exists():
        raise InputError(f"--input {path!r}: not found")
    with warnings.catch_warnings(record=True) as caught:  # the reader's warnings (misnamed gzip, sform vs
        warnings.simplefilter("always")                     # qform, DICOM order) as "warning:" lines
        try:
            volume, affine = load_volume(path)
        except Exception as err:  # nibabel/gzip/pydicom raise many types for a corrupt or foreign file
            raise InputError(f"--input {path!r}: cannot read the volume: {_one_line(err)}") from err
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return volume, affine


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from nny_models.inference import check_ct_volume, missing_clinical_columns, predict, read_clinical

    start = time.perf_counter()
    check_paths(args)  # before any work: never overwrite an input, never fail after inference
    check_device(args.device)
    volume, affine = load_input(args.input)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_ct_volume(np.asarray(volume), f"--input {args.input!r}", force=args.force, affine=affine)
        except ValueError as err:
            raise InputError(str(err)) from err
    forced = {str(w.message) for w in caught}  # the --force warning, printed once
    for message in forced:
        print(f"warning: {message}", file=sys.stderr)
    if args.backend == "onnxruntime":
        if len(args.model) > 1:
            raise InputError("--backend onnxruntime runs one model; pass --model once")
        model = load_onnx_backend(args.model[0], args.onnx)
    elif len(args.model) > 1:
        from nny_models.ensemble import Ensemble

        try:
            model = Ensemble([load_model(m, args.revision) for m in args.model])
        except ValueError as err:
            raise InputError(f"--model: {err}") from err
    else:
        model = load_model(args.model[0], args.revision)
    if args.keep_all_lesions:  # this run only: the model's config.json on disk is untouched
        model.config.lesion_in_organ = None
    if args.attention is not None:
        from nny_models.attention import attention_fusion

        try:
            attention_fusion(model)  # refuse before any inference
        except ValueError as err:
            raise InputError(f"--attention: {err}") from err

    clinical = None
    if args.clinical is not None:  # read, matched to the input's case id and encoded before any inference
        from nny_models.clinical import image_case_ids
        from nny_models.inference import clinical_vector

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = f"--input {args.input!r}"
            try:
                row = read_clinical(args.clinical, image_case_ids(args.input), image)
            except ValueError as err:
                raise InputError(f"--clinical: {err}") from err
            if isinstance(row, dict):
                # every member of an ensemble encodes the row with its own schema: each one's columns are needed
                members = getattr(model, "members", None) or [model]
                missing = list(dict.fromkeys(c for m in members
                                             for c in missing_clinical_columns(m.config.clinical_schema, row)))
                if missing and not args.allow_missing_clinical:
                    raise InputError(
                        f"--clinical {args.clinical!r} lacks column(s) {missing} expected by the model "
                        "(add them, empty values are imputed, or pass --allow-missing-clinical)"
                    )
            try:
                vector = clinical_vector(model, row, image_case_ids(args.input), image)
            except ValueError as err:
                raise InputError(f"--clinical {args.clinical!r}: {err}") from err
            clinical = None if vector is None else vector.numpy()
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = predict(
                model, volume, clinical=clinical, affine=affine, overlap=args.overlap,
                sw_batch_size=args.sw_batch_size, device=args.device,
                return_probabilities=args.probabilities is not None, force=args.force,
                precision=args.precision, tta=args.tta, source=args.input,
                return_attention=args.attention is not None,  # from the same forward passes as the mask
            )
        except ValueError as err:
            raise InputError(str(err)) from err
    for w in caught:
        if forced and any(text in str(w.message) for text in ("does not look like a CT", "inside the body are blank")):
            continue  # predict's own check: already printed above, with the file name
        print(f"warning: {w.message}", file=sys.stderr)
    out = list(out) if isinstance(out, tuple) else [out]
    mask = out.pop(0)
    probs = out.pop(0) if args.probabilities is not None else None
    amap = out.pop(0) if args.attention is not None else None

    _save_nifti(mask.astype(np.uint8), affine, args.output)
    if probs is not None:  # NIfTI keeps the three spatial axes first: (X, Y, Z, C)
        _save_nifti(np.moveaxis(probs, 0, -1).astype(np.float32), affine, args.probabilities)

    names = list(model.config.label_names)
    counts = np.bincount(mask.ravel(), minlength=len(names))
    print(f"wrote {args.output}  shape {tuple(mask.shape)}  in {time.perf_counter() - start:.1f} s")
    for label, count in enumerate(counts):
        name = names[label] if label < len(names) else f"label_{label}"
        print(f"  {label} {name:<12} {int(count):>10} voxels")
    if probs is not None:
        print(f"wrote {args.probabilities}  (softmax probabilities, X, Y, Z, C)")
    if amap is not None:
        _save_nifti(amap.astype(np.float32), affine, args.attention)
        print(f"wrote {args.attention}  (clinical-query attention, 1 = uniform, max {float(amap.max()):.2f})")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 700 else text[:697] + "..."


def main(argv: list[str] | None = None) -> int:
    from huggingface_hub.utils import logging as hub_logging  # configures its logger once, on import

    args = parse_args(argv)
    level = hub_logging.get_verbosity()
    if not args.debug:  # huggingface_hub logs every retry; the one error line says what failed
        hub_logging.set_verbosity_error()
    try:
        run(args)
    except InputError as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(err).__name__}: {_one_line(err)} (rerun with --debug)", file=sys.stderr)
        return 1
    finally:
        hub_logging.set_verbosity(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

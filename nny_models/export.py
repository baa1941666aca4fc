"""ONNX export of an NnyNet, and an ONNX Runtime network that ``predict`` runs like the torch one.

    nnynet-export --model DIR_OR_REPO --onnx out.onnx            # writes out.onnx, checks it against torch
    nnynet-predict --backend onnxruntime --model DIR --input ct.nii.gz --output mask.nii.gz [--onnx out.onnx]

    from nny_models.export import export_onnx, load_onnx_network
    export_onnx(model, "model.onnx")
    mask = predict(load_onnx_network("model_dir"), "ct.nii.gz")   # same pre/post-processing as torch

What is exported: the network only (``model.net`` in eval mode), inputs ``image`` (B, 1, *patch_size) float32
and, for a model with clinical fusion, ``clinical`` (B, F) float32 (NaN = missing value; a row of all NaN =
no clinical data, the learned "no clinical data" embedding, as ``clinical=None`` in torch); output ``logits``
(B, C, *patch_size). The batch is dynamic. The spatial size is fixed at the config's patch_size: MONAI's Swin
encoder decides its window count, padding and shifted-window masks in Python from the input size, so a traced
graph is only valid at the size it was traced with (checked: a graph with dynamic spatial axes fails in ONNX
Runtime at any other size). predict's sliding windows always have the patch size, so nothing is lost there.
Preprocessing and post-processing stay in Python and come from config.json (``predict``), identical for both
backends; the .onnx also carries config.json in its metadata ("nnynet_config") and a fingerprint of the weights it
was exported from ("nnynet_weights_sha256", ``weights_fingerprint``). A model.onnx runs only with the config.json
(every field but the descriptive metrics / plan) and the model.safetensors it was exported from: a stale export
beside a newer config.json or newer weights is refused, naming both files (an export older than the fingerprint
is checked on its config only). The file is written aside, checked, flushed to disk, then renamed into place
(a kill at any moment leaves the previous file or the new one, complete); the output must be named *.onnx, so an
export never lands on config.json, model.safetensors or any other input.

onnx and onnxruntime are an optional extra (``pip install nnynet[onnx]``); nothing else imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from nny_models.config import ABSENT, NnyNetConfig, first_difference
from nny_models.paths import fsync_file, process_running

logger = logging.getLogger(__name__)
DEFAULT_OPSET = 17  # LayerNormalization is native from 17; onnxruntime >= 1.14 runs it
ONNX_FILENAME = "model.onnx"  # looked for in the model folder by nnynet-predict --backend onnxruntime
VERIFY_ATOL = 1e-3  # export_onnx refuses a graph whose logits differ from torch's by more than this
CONFIG_KEY, WEIGHTS_KEY = "nnynet_config", "nnynet_weights_sha256"  # ONNX metadata written by export_onnx
MIN_OPSET = DEFAULT_OPSET  # below 17 LayerNormalization / instance_norm do not export (the exporter fails mid-trace)
TMP_MARK = ".tmp.onnx"  # ".<name>.<pid>.tmp.onnx": where export_onnx writes before the rename


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX export / inference needs the optional packages onnx and onnxruntime: pip install 'nnynet[onnx]'"
        ) from err
    return onnx, onnxruntime


def max_opset() -> int:
    """The newest opset the TorchScript exporter writes (20 in torch 2.13)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest
    except ImportError:  # a torch that moved the constant: its exporter still writes 20
        return 20
    return int(newest)


def check_opset(opset: Any) -> int:
    """``opset`` as an int the exporter supports for these networks, else ValueError naming it."""
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset {opset!r}: expected an ONNX opset from {MIN_OPSET} (LayerNormalization) to {top} "
                         f"(the newest torch's exporter writes)")
    return opset


def check_output_path(path: str | Path) -> Path:
    """The .onnx file export_onnx may write at ``path``, or ValueError naming it: a folder, a name without the
    .onnx suffix (``--onnx MODEL/config.json`` would replace the model's own config), a parent that is a file or
    cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an .onnx file name (e.g. {path / ONNX_FILENAME})")
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"{path}: expected a file name ending in .onnx; refusing to write an ONNX graph under "
                         "another file type's name (it could be an input, e.g. the model's config.json)")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be written: folder {existing} is not writable")
    return path


def _remove_stale_tmp(path: Path) -> None:
    """Delete what an export killed before its rename left beside ``path`` (its pid no longer runs)."""
    prefix = f".{path.name}."
    for leftover in path.parent.glob(f".{path.name}.*{TMP_MARK}"):
        pid = leftover.name[len(prefix) : -len(TMP_MARK)]
        if pid.isdigit() and not process_running(int(pid)):
            leftover.unlink(missing_ok=True)


def _clinical_features(net: nn.Module) -> int:
    fusion = getattr(net, "fusion", None)
    return int(getattr(fusion, "clinical_features", 0) or 0) if fusion is not None else 0


class _ExportWrapper(nn.Module):
    """The network with the positional inputs ONNX needs (image[, clinical])."""

    def __init__(self, net: nn.Module, clinical_features: int) -> None:
        super().__init__()
        self.net, self.clinical_features = net, clinical_features

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(image, clinical)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = VERIFY_ATOL,
) -> Path:
    """Write ``model`` (an NnyNet: ``.net`` + ``.config``) as ONNX with a dynamic batch; returns the path.

    verify: run the file in ONNX Runtime on random windows (batch 1 and 2, with clinical rows if the model
    fuses them) and raise RuntimeError if any logit differs from torch's by more than ``atol``.
    """
    onnx, _ = _require_onnx()
    from nny_models.ensemble import Ensemble
    from nny_models.tta import MirrorTTA

    if isinstance(model, Ensemble):  # its config.json is not an NnyNet config: the export could never be loaded
        raise ValueError("export_onnx: the model is an ensemble (nny_models.Ensemble), which is not exported as one "
                         "graph; export each member folder (nnynet-export --model ENSEMBLE/member_0 ...) instead")
    if isinstance(model, MirrorTTA):  # predict mirrors an ONNX network itself, as config.json says
        raise ValueError("export_onnx: the model is a MirrorTTA; export the model it wraps (MirrorTTA.model)")
    config, net = getattr(model, "config", None), getattr(model, "net", None)
    if not isinstance(config, NnyNetConfig) or not isinstance(net, nn.Module):
        raise ValueError("export_onnx: expected an NnyNet (a network with .net and .config); load it with "
                         "NnyNet.from_pretrained")
    opset = check_opset(opset)
    path = check_output_path(path)
    net = net.to("cpu").eval()
    features = _clinical_features(net)
    patch = tuple(int(p) for p in config.patch_size)
    image = torch.zeros(1, 1, *patch)
    args: tuple[torch.Tensor, ...] = (image,)
    input_names, dynamic = ["image"], {"image": {0: "batch"}, "logits": {0: "batch"}}
    if features:
        args += (torch.zeros(1, features),)
        input_names.append("clinical")
        dynamic["clinical"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    state = model.inference_state_dict() if hasattr(model, "inference_state_dict") else \
        {"net." + k: v for k, v in net.state_dict().items()}
    # Written aside, checked, then renamed over ``path``: neither a crash nor a failed check leaves a half-written
    # or unverified file under the final name (a previous export there stays as it was until the swap).
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_MARK}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python-int shapes: why spatial is fixed
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter (no onnxscript)
            warnings.filterwarnings("ignore", message="Constant folding")  # strided slices stay as Slice ops
            warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")  # InstanceNorm: no running stats
            try:
                torch.onnx.export(
                    _ExportWrapper(net, features), args, str(tmp), dynamo=False, opset_version=opset,
                    input_names=input_names, output_names=["logits"], dynamic_axes=dynamic,
                )  # fmt: skip
            except OSError:
                raise
            except Exception as err:  # the network cannot run (or trace) at this size: say which size, keep nothing
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise RuntimeError(
                    f"{path}: tracing {config.model} at one window of patch_size {list(patch)} (config.json) with "
                    f"opset {opset} failed: {first}; nothing was written"
                ) from err
        proto = onnx.load(str(tmp))
        meta = {CONFIG_KEY: json.dumps(config.to_dict()), WEIGHTS_KEY: weights_fingerprint(state),
                "patch_size": json.dumps(list(patch)), "clinical_features": str(features)}  # fmt: skip
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        fsync_file(tmp)
        if verify:
            try:
                check_onnx_matches_torch(tmp, model, atol=atol)
            except RuntimeError as err:
                raise RuntimeError(f"{path}: {str(err).removeprefix(f'{tmp}: ')}; nothing was written") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an NnyNet inference state dict (keys "net.*"): names, dtypes, shapes and bytes, in key order.

    The same for the model in memory and for its model.safetensors (``_file_fingerprint``), whatever the
    safetensors version that wrote the file; export_onnx stores it in the metadata, load_onnx_network checks it."""
    digest = hashlib.sha256(b"nnynet weights v1\0")
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\0")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_fingerprint(weights: Path, config: NnyNetConfig) -> str:
    """weights_fingerprint of model.safetensors as from_pretrained loads it (deep-supervision heads dropped)."""
    import safetensors.torch
    from safetensors import SafetensorError

    from nny_models import zoo

    try:
        state = safetensors.torch.load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    drop = tuple("net." + p for p in zoo.deep_supervision_prefixes(config.model))
    return weights_fingerprint({k: v for k, v in state.items() if not (drop and k.startswith(drop))})


def check_onnx_matches_torch(path: str | Path, model: nn.Module, *, atol: float = VERIFY_ATOL, seed: int = 0) -> float:
    """Max |logits_onnx - logits_torch| on random windows in [-1, 1] (batch 1 and 2); RuntimeError above atol."""
    onnx_net = OnnxRuntimeNetwork(path, model.config)
    net = getattr(model, "net", model).to("cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 2):
        image = torch.rand(batch, 1, *onnx_net.patch_size, generator=gen) * 2 - 1
        clinical = None
        if onnx_net.clinical_features:
            clinical = torch.randn(batch, onnx_net.clinical_features, generator=gen)
            clinical[0, 0] = float("nan")  # a missing value takes the mask path
        with torch.no_grad():
            ref = net(image, clinical).float()
        worst = max(worst, float((onnx_net(image, clinical) - ref).abs().max()))
    if not worst <= atol:
        raise RuntimeError(f"{path}: ONNX Runtime logits differ from torch's by {worst:.3g} (> {atol:g})")
    return worst


class OnnxRuntimeNetwork(nn.Module):
    """An exported network run by ONNX Runtime, called like the torch one: ``net(image, clinical=None)``.

    It has no parameters; ``config`` (the NnyNetConfig of config.json) gives predict the pre- and
    post-processing, so ``predict(OnnxRuntimeNetwork(...), ct)`` follows the torch pipeline exactly.
    fp32 only (``supports_bf16 = False``): predict's precision "auto" runs it in fp32.
    """

    supports_bf16 = False

    def __init__(self, path: str | Path, config: NnyNetConfig, *, providers: list[str] | None = None,
                 threads: int | None = None, config_source: str = "the config given") -> None:  # fmt: skip
        """``config_source`` names where ``config`` came from in errors (load_onnx_network: the config.json path).

        The file's nnynet_config metadata must equal ``config`` in every field but the descriptive ones
        (``NnyNetConfig.inference_dict``), else ValueError naming the first differing field: the graph was exported
        from another model than the one whose pre- and post-processing predict would wrap around it."""
        super().__init__()
        _, ort = _require_onnx()
        self.path, self.config = str(path), config
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many threads as torch uses
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt / foreign files
            raise ValueError(f"{self.path}: not a loadable ONNX model: {' '.join(str(err).split())[:300]}") from err
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "image" not in inputs:
            raise ValueError(f"{self.path}: expected an ONNX input named 'image' (an nnynet-export file), got {list(inputs)}")
        shape = inputs["image"].shape
        if len(shape) != 5 or not all(isinstance(s, int) for s in shape[2:]):
            raise ValueError(f"{self.path}: input 'image' must be (batch, 1, X, Y, Z) with fixed X, Y, Z, got {shape}")
        self.patch_size = tuple(int(s) for s in shape[2:])
        if self.patch_size != tuple(int(p) for p in config.patch_size):
            raise ValueError(
                f"{self.path}: exported for windows of {list(self.patch_size)} voxels but config.json has patch_size "
                f"{list(config.patch_size)}; export the model again (nnynet-export)"
            )
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._check_config(config, config_source)
        self._check_graph(inputs, config, config_source)
        self.clinical_features = int(inputs["clinical"].shape[1]) if "clinical" in inputs else 0
        # what predict's clinical handling looks for on a torch network (net.fusion.clinical_features)
        self.fusion = SimpleNamespace(clinical_features=self.clinical_features) if self.clinical_features else None
        self.size_divisor = 1  # the graph takes exactly patch_size, which predict always feeds

    def _check_config(self, config: NnyNetConfig, source: str) -> None:
        again = "export the model again (nnynet-export --model DIR)"
        if CONFIG_KEY not in self.metadata:
            raise ValueError(f"{self.path}: no {CONFIG_KEY} in the ONNX metadata (not an nnynet-export file), so "
                             f"nothing shows it was exported from {source}; {again}")
        try:
            embedded = NnyNetConfig.from_saved(json.loads(self.metadata[CONFIG_KEY]))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: invalid {CONFIG_KEY} in the ONNX metadata: {err}") from err
        found = first_difference(embedded.inference_dict(), config.inference_dict())
        if found is not None:
            name, theirs, ours = found
            raise ValueError(
                f"{self.path}: exported from another model than {source}: field {name!r} is {_short(theirs)} in "
                f"the export's {CONFIG_KEY} metadata but {_short(ours)} in {source}; refusing to run a stale export "
                f"with this config; {again}"
            )

    def _check_graph(self, inputs: dict[str, Any], config: NnyNetConfig, source: str) -> None:
        """The graph's own inputs and output against ``config``: its metadata could have been copied onto another
        graph, and a graph with fewer classes or without the clinical input would run and give a wrong mask."""
        again = "export the model again (nnynet-export --model DIR)"
        image = inputs["image"]
        if image.shape[1] != 1 or image.type != "tensor(float)":
            raise ValueError(f"{self.path}: input 'image' must be float32 (batch, 1, X, Y, Z), got {image.type} "
                             f"{image.shape}; {again}")
        outputs = {o.name: o for o in self.session.get_outputs()}
        classes = len(config.label_names)
        logits = outputs.get("logits")
        if logits is None or len(logits.shape) != 5:
            raise ValueError(f"{self.path}: expected an output 'logits' (batch, classes, X, Y, Z), got "
                             f"{ {n: o.shape for n, o in outputs.items()} }; {again}")
        if isinstance(logits.shape[1], int) and logits.shape[1] != classes:
            raise ValueError(f"{self.path}: output 'logits' has {logits.shape[1]} classes but {source} has "
                             f"{classes} label_names {list(config.label_names)}; {again}")
        kwargs = config.model_kwargs
        expected = int(kwargs.get("clinical_features", 0) or 0) if kwargs.get("fusion", "none") != "none" else 0
        found = inputs["clinical"].shape[1] if "clinical" in inputs else 0
        if found != expected:
            raise ValueError(f"{self.path}: the graph takes {found or 'no'} clinical features but {source} has "
                             f"model_kwargs fusion {kwargs.get('fusion', 'none')!r} with {expected}; {again}")

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(image.shape[1:]) != (1, *self.patch_size):
            raise ValueError(f"{self.path}: expected windows (B, 1, {', '.join(map(str, self.patch_size))}), "
                             f"got {tuple(image.shape)}")  # fmt: skip
        feeds = {"image": image.detach().to("cpu", torch.float32).contiguous().numpy()}
        if self.clinical_features:
            if clinical is None:  # all missing = the "no clinical data" embedding, as clinical=None in torch
                feeds["clinical"] = np.full((image.shape[0], self.clinical_features), np.nan, dtype=np.float32)
            else:
                feeds["clinical"] = clinical.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run(["logits"], feeds)[0]
        expected = (image.shape[0], len(self.config.label_names), *self.patch_size)
        if tuple(logits.shape) != expected:  # never argmax over a tensor of another layout
            raise ValueError(f"{self.path}: ONNX Runtime returned logits of shape {tuple(logits.shape)}, "
                             f"expected {expected}")
        return torch.from_numpy(logits).to(image.device)


def load_onnx_network(model_dir: str | Path | None, onnx_path: str | Path | None = None, **kwargs: Any) -> OnnxRuntimeNetwork:
    """OnnxRuntimeNetwork from a model folder (config.json + model.onnx) or an explicit .onnx path.

    With only ``onnx_path``, config.json is taken from the .onnx metadata written by export_onnx. With a folder,
    the export must have been made from its config.json (``OnnxRuntimeNetwork``) and, where the folder has
    model.safetensors and the export records a weights fingerprint, from those weights: else a ValueError naming
    both files (a stale model.onnx beside a newer model, or --onnx naming another model's file).
    """
    onnx, _ = _require_onnx()
    folder = Path(model_dir) if model_dir is not None else None
    path = Path(onnx_path) if onnx_path is not None else (folder / ONNX_FILENAME if folder is not None else None)
    if path is None:
        raise ValueError("load_onnx_network: give a model folder or an .onnx path")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an .onnx file (e.g. {path / ONNX_FILENAME})")
    if not path.is_file():
        hint = f" (run: nnynet-export --model {folder} --onnx {path})" if folder is not None else ""
        raise ValueError(f"{path}: no such ONNX file{hint}")
    if folder is not None and (folder / "config.json").is_file():
        config_path = folder / "config.json"
        try:
            config = NnyNetConfig.from_saved(json.loads(config_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{config_path}: not a valid nnynet config.json: {err}") from err
        net = OnnxRuntimeNetwork(path, config, config_source=str(config_path), **kwargs)
        weights = folder / "model.safetensors"
        if weights.is_file():
            _check_weights(net, weights, config)
        return net
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:
        raise ValueError(f"{path}: not a readable ONNX file: {' '.join(str(err).split())[:300]}") from err
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY} in the ONNX metadata and no config.json beside it")
    try:
        config = NnyNetConfig.from_saved(json.loads(meta[CONFIG_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid {CONFIG_KEY} in the ONNX metadata: {err}") from err
    return OnnxRuntimeNetwork(path, config, config_source=f"its {CONFIG_KEY} metadata", **kwargs)


def _check_weights(net: OnnxRuntimeNetwork, weights: Path, config: NnyNetConfig) -> None:
    """ValueError unless ``net`` was exported from ``weights`` (an export without a fingerprint: a warning)."""
    recorded = net.metadata.get(WEIGHTS_KEY)
    if recorded is None:
        logger.warning("%s has no weights fingerprint (%s; exported by an older nnynet): only its config was checked "
                       "against config.json, not its weights against %s; export the model again to check both",
                       net.path, WEIGHTS_KEY, weights)
        return
    actual = _file_fingerprint(weights, config)
    if actual != recorded:
        raise ValueError(f"{net.path}: exported from other weights than {weights} (weights fingerprint "
                         f"{recorded[:12]}... vs {actual[:12]}...); refusing to run a stale export with these weights; "
                         f"export the model again (nnynet-export --model {weights.parent})")


def _short(value: Any, limit: int = 80) -> str:
    """A config value for a one-line message: JSON, cut at ``limit`` characters."""
    text = value if value is ABSENT else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """``nnynet-export --model DIR_OR_REPO --onnx out.onnx``: export and check against torch; exit 2 on bad input."""
    p = argparse.ArgumentParser(prog="nnynet-export", description="Export an NnyNet to ONNX (dynamic batch).")
    p.add_argument("--model", required=True, help="save_pretrained folder or Hub repo id")
    p.add_argument("--onnx", default=None, help=f"output .onnx (default: MODEL/{ONNX_FILENAME} for a folder)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    args = p.parse_args(argv)
    from nny_models.cli import InputError, _one_line, load_model

    out = args.onnx
    try:  # every check that needs no model first: a bad --onnx or --opset fails before the load (maybe a download)
        _require_onnx()
        if out is None:
            if not Path(args.model).expanduser().is_dir():
                raise InputError("--onnx is required when --model is a Hub repo id")
            out = str(Path(args.model).expanduser() / ONNX_FILENAME)
        check_opset(args.opset)
        check_output_path(out)
        model = load_model(args.model, args.revision)
        path = export_onnx(model, out, opset=args.opset, verify=not args.no_verify)
    except (InputError, ImportError, ValueError, RuntimeError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made read-only meanwhile: nothing was written under --onnx
        print(f"error: {out}: cannot write the export: {_one_line(err)}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 2**20
    checked = "" if args.no_verify else f", ONNX Runtime matches torch within {VERIFY_ATOL:g}"
    print(f"wrote {path} ({size:.1f} MiB; input image (batch, 1, {', '.join(map(str, model.config.patch_size))})"
          f"{checked})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

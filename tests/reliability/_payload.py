"""Pickle payloads for the resume tests: unpickling one runs ``touch MARKER`` through os.system."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

# Files Accelerate's save_state / load_state would write or read in a checkpoint folder, besides ours.
ACCELERATE_FILES = ("random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin", "pytorch_model.bin",
                    "scaler.pt", "sampler.bin", "dl_state_dict.bin")  # fmt: skip


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a payload: a torch.save zip for .bin/.pt files, a plain pickle otherwise."""
    path.unlink(missing_ok=True)
    if path.suffix in (".bin", ".pt"):
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def check_payload_works(tmp_path: Path) -> None:
    """The payload does run when unpickled unsafely: the tests that assert it never runs can fail."""
    marker = tmp_path / "payload_selftest"
    plant(tmp_path / "selftest.bin", marker)
    torch.load(tmp_path / "selftest.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

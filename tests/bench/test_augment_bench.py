"""bench/augment.py runs at any --samples (it crashed below 4: the forced-transform rows time 6 indices)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_augment_bench_with_fewer_samples_than_the_forced_rows(one_thread):
    import augment

    row = augment.main(["--samples", "2", "--steps", "1"])
    assert row["ours"] > 0 and row["peer"] > 0
    assert set(row["forced_s"]) == {"rotation", "scaling", "noise", "blur", "brightness", "contrast", "low_res",
                                    "thick_slices", "ct_noise", "gamma_inverted", "gamma"}
    with pytest.raises(SystemExit):
        augment.main(["--samples", "0"])

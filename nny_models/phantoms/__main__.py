"""CLI: python -m nny_models.phantoms --out DIR --cases N --seed S [--unlabeled] [--preset demo|ct|test]
[--randomization train|ood] [--preview]"""

from __future__ import annotations

import argparse
import time

from .dataset import case_seed, save_preview, write_dataset
from .generate import generate_phantom
from .presets import PRESETS
from .randomization import RANDOMIZATIONS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nny_models.phantoms", description=__doc__)
    ap.add_argument("--out", required=True, help="output directory (MSD layout)")
    ap.add_argument("--cases", type=int, default=10, help="number of cases")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (case i uses a seed derived from it)")
    ap.add_argument("--unlabeled", action="store_true", help="write images only (pretraining data)")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="acquisition preset")
    ap.add_argument("--randomization", default="train", choices=sorted(RANDOMIZATIONS),
                    help="appearance ranges: train (the training world), ood (a shifted held-out set) or "
                         "unenhanced (non-contrast scans, half of them of fatty livers)")
    ap.add_argument("--workers", type=int, default=1, help="processes used to generate cases")
    ap.add_argument("--preview", action="store_true", help="also write preview.png of the first case")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_dataset(args.out, args.cases, args.seed, unlabeled=args.unlabeled, preset=args.preset,
                        workers=args.workers, randomization=args.randomization)
    dt = time.perf_counter() - t0
    print(f"wrote {args.cases} cases to {out} in {dt:.1f} s ({dt / args.cases:.2f} s/case)")
    if args.preview:
        case = generate_phantom(case_seed(args.seed, 0), preset=args.preset, case_id="phantom_000",
                                randomization=args.randomization)
        print(f"preview: {save_preview(case, out / 'preview.png')}")


if __name__ == "__main__":
    main()

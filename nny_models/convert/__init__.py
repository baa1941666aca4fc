"""``nnynet-convert``: turn public data sets into the layout the stages read (MSD folders + clinical.csv).

    nnynet-convert hcc-tace-seg SRC DST [--clinical sheet.xlsx] [--segments map.json] [--columns map.json]

Errors in the source data end with one "error: ..." line on stderr and exit code 2 (--debug: traceback).
"""

from __future__ import annotations

import argparse
import sys
import warnings

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nnynet-convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="dataset", required=True)
    h = sub.add_parser("hcc-tace-seg", help="TCIA HCC-TACE-Seg: CT DICOM + DICOM-SEG + clinical spreadsheet")
    h.add_argument("src", help="the downloaded collection (any folder nesting)")
    h.add_argument("dst", help="output folder: imagesTr/, labelsTr/, dataset.json, clinical.csv")
    h.add_argument("--clinical", help="clinical spreadsheet (.xlsx/.csv); default: the one file under SRC "
                                      "whose name contains 'clinical'")
    h.add_argument("--segments", help="segment-name mapping JSON (default: hcc_tace_seg_segments.json)")
    h.add_argument("--columns", help="spreadsheet column mapping JSON (default: hcc_tace_seg_columns.json)")
    h.add_argument("--overwrite", action="store_true",
                   help="replace a previous conversion in DST (a folder holding only its outputs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nny_models.convert.hcc_tace_seg import ConversionError, convert

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                meta = convert(args.src, args.dst, clinical=args.clinical, segments=args.segments,
                               columns=args.columns, overwrite=args.overwrite)
            finally:
                for w in caught:  # one line each, as the errors
                    print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    except (ConversionError, ImportError, OSError) as err:  # OSError: a full disk, an unwritable DST parent
        if args.debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {meta['numTraining']} case(s) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

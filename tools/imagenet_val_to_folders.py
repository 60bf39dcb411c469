#!/usr/bin/env python3
"""Re-lay ImageNet's flat validation folder (ILSVRC2012_val_00000001.JPEG, ...) into class folders, the
layout edgecv's `imagefolder` dataset (and torchvision's ImageFolder) reads, with symbolic links, not
copies (no second 6.4 GB; relative links, so the dataset folder can be moved as a whole).

    python tools/imagenet_val_to_folders.py VAL_FLAT OUT --csv LOC_val_solution.csv
    python tools/imagenet_val_to_folders.py VAL_FLAT OUT --devkit ILSVRC2012_devkit_t12
    python tools/imagenet_val_to_folders.py VAL_FLAT OUT --devkit DEVKIT --synsets synsets_by_id.txt

--csv: Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the first word of PredictionString is
the image's WordNet id). --devkit: data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per
image, in file-number order) with data/meta.mat (ID -> WordNet id; reading it needs scipy), or with
--synsets, a text file of WordNet ids in ILSVRC2012_ID order (line 1 = ID 1).

Rerunning is safe: links already in place are kept. Exit codes: 0 done, 1 some labelled images are missing
from VAL_FLAT, 2 bad input (one `error:` line). Needs only the Python standard library (scipy for meta.mat).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class InputError(Exception):
    """A mistake in the arguments or files: reported as one line, exit code 2."""


def labels_from_csv(path: Path) -> dict[str, str]:
    """{image id: WordNet id} from LOC_val_solution.csv."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise InputError(f"--csv {str(path)!r}: cannot read ({exc.strerror})") from None
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise InputError(f"--csv {str(path)!r}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)")
    labels = {}
    for line, row in enumerate(rows, start=2):
        words = (row["PredictionString"] or "").split()
        if not words or not words[0].startswith("n"):
            raise InputError(f"--csv {str(path)!r} line {line}: no WordNet id (nXXXXXXXX) in {row['PredictionString']!r}")
        labels[row["ImageId"].strip()] = words[0]
    return labels


def synsets_from_meta(devkit: Path) -> list[str]:
    """WordNet ids in ILSVRC2012_ID order from the devkit's meta.mat (needs scipy)."""
    meta = devkit / "data" / "meta.mat"
    try:
        from scipy.io import loadmat
    except ImportError:
        raise InputError(f"reading {meta} needs scipy (pip install scipy); or pass --synsets FILE, or use --csv "
                         "LOC_val_solution.csv") from None
    if not meta.is_file():
        raise InputError(f"--devkit {str(devkit)!r}: no data/meta.mat")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    return [by_id[i] for i in sorted(by_id)]


def labels_from_devkit(devkit: Path, synsets_file: Path | None) -> dict[str, str]:
    """{image id: WordNet id} from the devkit's ground truth (line n = ILSVRC2012_val_{n:08d})."""
    truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    if not truth.is_file():
        raise InputError(f"--devkit {str(devkit)!r}: no data/ILSVRC2012_validation_ground_truth.txt")
    if synsets_file is not None:
        try:
            synsets = [w.strip() for w in synsets_file.read_text().split() if w.strip()]
        except OSError as exc:
            raise InputError(f"--synsets {str(synsets_file)!r}: cannot read ({exc.strerror})") from None
    else:
        synsets = synsets_from_meta(devkit)
    labels = {}
    for n, text in enumerate(truth.read_text().split(), start=1):
        if not text.isdigit() or not 1 <= int(text) <= len(synsets):
            raise InputError(f"{truth} line {n}: {text!r} is not a class id between 1 and {len(synsets)}")
        labels[f"ILSVRC2012_val_{n:08d}"] = synsets[int(text) - 1]
    return labels


def relay(flat: Path, out: Path, labels: dict[str, str]) -> dict:
    """Link each labelled image of `flat` into out/<wnid>/; returns counts and the missing image ids."""
    if not flat.is_dir():
        raise InputError(f"validation folder {str(flat)!r} does not exist")
    files = {p.stem: p for p in flat.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    linked = kept = 0
    missing = sorted(i for i in labels if i not in files)
    for image_id, wnid in sorted(labels.items()):
        source = files.get(image_id)
        if source is None:
            continue
        link = out / wnid / source.name
        target = os.path.relpath(source.resolve(), _resolved(link.parent))
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == source.resolve():
                kept += 1
                continue
            raise InputError(f"{link} exists and is not a link to {source}; remove it or choose another OUT")
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
        linked += 1
    unlabelled = sorted(set(files) - set(labels))
    return {"linked": linked, "already_linked": kept, "classes": len(set(labels.values())), "missing": missing,
            "unlabelled": unlabelled}


def _resolved(folder: Path) -> Path:
    """`folder` resolved as it will be once created (its nearest existing parent resolved)."""
    parts = []
    while not folder.exists():
        parts.append(folder.name)
        folder = folder.parent
    return folder.resolve().joinpath(*reversed(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("val_flat", type=Path, help="the flat validation folder (ILSVRC2012_val_*.JPEG)")
    parser.add_argument("out", type=Path, help="the folder to create class folders of links in (e.g. imagenet/val)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="LOC_val_solution.csv")
    source.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12 folder")
    parser.add_argument("--synsets", type=Path, help="with --devkit: WordNet ids in ILSVRC2012_ID order, one a line")
    args = parser.parse_args(argv)
    try:
        if args.synsets and not args.devkit:
            raise InputError("--synsets goes with --devkit")
        labels = labels_from_csv(args.csv) if args.csv else labels_from_devkit(args.devkit, args.synsets)
        result = relay(args.val_flat, args.out, labels)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"linked {result['linked']} images into {result['classes']} class folders under {args.out} "
          f"({result['already_linked']} already linked)")
    if result["unlabelled"]:
        print(f"warning: {len(result['unlabelled'])} images have no label and were left out "
              f"(first: {result['unlabelled'][0]})", file=sys.stderr)
    if result["missing"]:
        print(f"error: {len(result['missing'])} labelled images are not in {args.val_flat} "
              f"(first: {result['missing'][0]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

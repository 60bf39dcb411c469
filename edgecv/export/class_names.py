"""The class names of an exported ONNX file, in output order, kept in its metadata_props: a model file says
what each of its outputs means, whoever reads it (`edgecv eval` maps a folder's classes by these names)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_bytes

META_CLASSES = "edgecv.class_names"  # a JSON list of strings, one per output


def stamp_class_names(path: Path, class_names: Sequence[str] | None) -> None:
    """Record `class_names` in the ONNX file at `path` (rewritten atomically); nothing to record: unchanged."""
    if not class_names:
        return
    import onnx

    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != META_CLASSES]
    del proto.metadata_props[:]
    for key, value in [*kept, (META_CLASSES, json.dumps(list(class_names)))]:
        proto.metadata_props.add(key=key, value=value)
    atomic_write_bytes(path, proto.SerializeToString())


def class_names_in(props: Mapping[str, str], source: Path | str) -> list[str] | None:
    """The class names recorded in an ONNX file's metadata_props (None when it records none)."""
    text = props.get(META_CLASSES)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EdgecvError(f"{str(source)!r}: metadata {META_CLASSES} is not a JSON list of class names")
    return names

"""A user's own trained weights (`model.weights: PATH`): a state dict in a .pt/.pth/.bin/.ckpt file (read with
`torch.load(weights_only=True)`) or a .safetensors file, loaded into the model its builder builds.

Trainers wrap the state dict: under `state_dict`, `model`, `state_dict_ema` or `model_ema` (torchvision's and
timm's reference scripts, Lightning), with keys prefixed `module.` (DataParallel / DDP), `model.` (Lightning)
or `_orig_mod.` (torch.compile). Those wrappings are taken off; anything else that does not fit the model
(missing or unexpected keys, a tensor of another shape, another class count) is a one-line error saying
what to do. The model is never changed to fit the file, except the classifier with `model.head: new`.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.errors import EdgecvError
from edgecv.models.adapt import AUX_HEADS, find_classifier

WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Where trainers nest the state dict, in the order looked at (the plain weights before their EMA).
NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
SHOWN_KEYS = 3  # keys named in an error line
SAVE_STATE_DICT = "save the state dict instead: torch.save(model.state_dict(), PATH)"


@dataclass(frozen=True)
class WeightsLoad:
    """What loading a weights file did, for the log and the report."""

    file: str
    sha256: str
    nested_under: str | None  # the checkpoint key the state dict was found under
    prefix_removed: str | None  # e.g. "module." from a DataParallel / DDP wrapper
    tensors: int
    head: str  # "kept" | "new"
    file_classes: int | None  # the classifier's class count in the file (None: no classifier in it)
    model_classes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: which file, how it was unwrapped, what happened to the classifier."""
        how = [f"state dict under '{self.nested_under}'"] if self.nested_under else []
        how += [f"prefix '{self.prefix_removed}' removed"] if self.prefix_removed else []
        text = f"weights from {self.file} ({self.tensors} tensors" + "".join(f", {h}" for h in how) + ")"
        if self.head == "new":
            was = f"{self.file_classes} classes in the file" if self.file_classes else "none in the file"
            return text + f"; model.head: new replaced the classifier ({was}, {self.model_classes} now, untrained)"
        return text + "; the classifier is the file's own"


def is_weights_file(weights: str | None) -> bool:
    """Whether `model.weights` names a file (an existing file, or a name ending in a weights suffix) rather
    than a torchvision weights enum name such as IMAGENET1K_V1."""
    if not weights:
        return False
    return Path(weights).expanduser().is_file() or weights.lower().endswith(WEIGHTS_SUFFIXES)


def file_digest(path: str | Path) -> str:
    """sha256 of a file (a rerun with a retrained file of the same name starts over)."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ reading
def read_weights_file(path: Path, where: str) -> Any:
    """The file's content (tensors, dicts, lists, numbers, strings), or one line starting with `where` saying
    why it cannot be read: missing, truncated or corrupt, a pickled whole model, safetensors not installed."""
    if not path.is_file():
        raise EdgecvError(f"{where}: no such file (a path to a state dict: {', '.join(WEIGHTS_SUFFIXES)})")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path, where)
    import argparse

    try:  # torchvision's and timm's training scripts store their argparse arguments beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling, zip and storage errors of every kind
        raise EdgecvError(f"{where}: {_load_failure(exc)}") from None


def _read_safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EdgecvError(f"{where}: reading .safetensors files needs the safetensors package: "
                          "pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise EdgecvError(f"{where}: not a readable safetensors file (truncated or corrupt? {first})") from None


def _load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in words a user can act on."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1)
        what = "a pickled whole model" if _is_module_class(name) else "Python objects besides tensors"
        return (f"holds {what} ({name}), which edgecv does not unpickle (torch.load(weights_only=True)); "
                f"{SAVE_STATE_DICT}")
    first = (text.splitlines() or [type(exc).__name__])[0][:120]
    return f"not a readable PyTorch file (truncated or corrupt? {type(exc).__name__}: {first})"


def _is_module_class(dotted: str) -> bool:
    """Whether `dotted` names an nn.Module subclass of an already imported module (nothing is imported)."""
    module_name, _, attr = dotted.rpartition(".")
    obj = getattr(sys.modules.get(module_name), attr, None)
    return isinstance(obj, type) and issubclass(obj, nn.Module)


# ------------------------------------------------------------------------------------------ unwrapping
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(content: Any, where: str) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """(the state dict, the checkpoint key it was under or None) from what a trainer saved."""
    if _is_state_dict(content):
        return content, None
    if isinstance(content, Mapping):
        for key in NESTED_KEYS:
            inner = content.get(key)
            if _is_state_dict(inner):
                return inner, key
            if isinstance(inner, Mapping):  # e.g. {"model": {"state_dict": ...}}
                for sub in NESTED_KEYS:
                    if _is_state_dict(inner.get(sub)):
                        return inner[sub], f"{key}.{sub}"
        keys = ", ".join(repr(k) for k in list(content)[:6])
        raise EdgecvError(f"{where}: no state dict in the file (a dict of tensors, or one under "
                          f"{', '.join(NESTED_KEYS)}); its keys: {keys}; {SAVE_STATE_DICT}")
    raise EdgecvError(f"{where}: holds a {type(content).__name__}, not a state dict; {SAVE_STATE_DICT}")


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> tuple[dict, str | None]:
    """Take off the prefixes that wrappers add to every key (`module.`, `model.`, `_orig_mod.`, ...) while
    that makes more of the keys the model's own; returns (state, the prefix removed or None)."""
    removed = ""
    state = dict(state)
    while state:
        first = {k.split(".", 1)[0] for k in state}
        if len(first) != 1 or not all("." in k for k in state):
            break
        prefix = f"{next(iter(first))}."
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if len(stripped.keys() & model_keys) <= len(state.keys() & model_keys):
            break
        state, removed = stripped, removed + prefix
    return state, removed or None


def with_module_versions(state: dict, saved: Mapping, prefix: str | None, own: Mapping) -> OrderedDict:
    """`state` with the per-module versions `torch.save(model.state_dict())` keeps beside the tensors (some
    models check them when loading, e.g. torchvision's MNASNet): the file's, under the same prefix taken off,
    else the model's own (a file without them was written by a dict copy, safetensors, ...)."""
    out = OrderedDict(state)
    versions = getattr(saved, "_metadata", None)
    if versions is not None and prefix:
        root = prefix.rstrip(".")
        versions = {("" if k == root else k[len(prefix):]): v for k, v in versions.items()
                    if k == root or k.startswith(prefix)}
    out._metadata = OrderedDict(versions if versions is not None else getattr(own, "_metadata", {}))  # type: ignore[attr-defined]
    return out


# ------------------------------------------------------------------------------------------ fitting
def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def check_keys(state: dict, own: dict, where: str, name: str, head_keys: set[str]) -> None:
    """Missing or unexpected keys: one line naming the first few and what to do."""
    optional = {k for k in own if k.endswith("num_batches_tracked")} | head_keys
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own and k.split(".", 1)[0] not in AUX_HEADS]
    if not missing and not unexpected:
        return
    matched = len(own.keys() & state.keys())
    parts = [f"{len(missing)} of the model's keys missing ({_names(missing)})"] if missing else []
    parts += [f"{len(unexpected)} keys the model does not have ({_names(unexpected)})"] if unexpected else []
    if matched < len(own) // 2:
        advice = "is it a state dict of another architecture? set model.name to the one it was trained as"
    else:
        advice = "save only the network's own state dict (without extra modules such as a loss or a teacher)"
    raise EdgecvError(f"{where} does not fit {name}: " + "; ".join(parts) + f" ({matched} of {len(own)} match); "
                      + advice)


def check_shapes(state: dict, own: dict, where: str, name: str, head_keys: set[str], head: str) -> int | None:
    """Tensors of another shape: one line naming the key and both shapes, or (for the classifier) the
    class counts and `model.head: new`. Returns the file's class count (None: no classifier in it)."""
    file_classes = None
    for key in sorted(head_keys & state.keys()):
        if state[key].dim() >= 1:
            file_classes = int(state[key].shape[0])
    for key, tensor in state.items():
        mine = own.get(key)
        if mine is None or tuple(mine.shape) == tuple(tensor.shape):
            continue
        if key in head_keys:
            if head == "new":
                continue
            raise EdgecvError(
                f"{where}: its classifier ({key}) has {file_classes} classes, the data has {mine.shape[0]}: "
                "set model.head: new to replace the classifier (trained from scratch), or use data of "
                f"the {file_classes} classes it was trained on")
        raise EdgecvError(f"{where} does not fit {name}: {key} is {_shape(tensor)} in the file, "
                          f"{_shape(mine)} in the model")
    return file_classes


def load_user_weights(model: nn.Module, weights: str, head: str = "keep", name: str = "the model") -> WeightsLoad:
    """Load the state dict in the file `weights` into `model` (built by its builder for the data's class
    count); with `head: new` the classifier is a fresh one instead of the file's."""
    path = Path(weights).expanduser()
    where = f"model.weights {weights!r}"
    saved, nested = find_state_dict(read_weights_file(path, where), where)
    own = model.state_dict()
    state, prefix = strip_wrapper_prefix(saved, set(own))
    classifier = find_classifier(model)
    head_keys = {f"{classifier[0]}.{p}" for p, _ in classifier[1].named_parameters()} if classifier else set()
    check_keys(state, own, where, name, head_keys if head == "new" else set())
    file_classes = check_shapes(state, own, where, name, head_keys, head)
    state = {k: v for k, v in state.items() if k in own and not (head == "new" and k in head_keys)}
    try:
        result = model.load_state_dict(with_module_versions(state, saved, prefix, own), strict=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # a model's own load rules (versions, layouts)
        raise EdgecvError(f"{where} does not load into {name} ({(str(exc).splitlines() or [''])[0][:160]})") from None
    left = [k for k in result.missing_keys if k not in head_keys and not k.endswith("num_batches_tracked")]
    if left:  # check_keys already refused this; a model with its own load rules may still differ
        raise EdgecvError(f"{where} does not fit {name}: {_names(left)} not loaded")
    model_classes = _out_count(classifier[1]) if classifier else None
    return WeightsLoad(str(weights), file_digest(path), nested, prefix, len(state), "new" if head == "new" else "kept",
                       file_classes, model_classes)


def _out_count(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

"""The building blocks of every configuration section: a strict pydantic base, choices taken from a
registry, one-line validation messages, and YAML reading with `--set a.b=value` overrides.

Each package defines the section it owns (data, model, train, bench, each stage) on top of `Strict`;
`edgecv.recipe` composes them. This module imports neither torch nor any plug-in.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgecv.errors import EdgecvError
from edgecv.registry import Registry

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    """Base for every configuration section: unknown keys are errors with a suggestion, and a key of an
    older edgecv is refused with its new spelling (`renamed`: old key -> new spelling in this section, e.g.
    `{"iterative_steps": "steps", "global_pruning": "allocation: global"}`; inherited by subclasses)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}
    removed: ClassVar[dict[str, str]] = {}  # old key -> what to do instead (a key no recipe or test used)

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        """Old key -> new spelling, from this class and every config class it is made of."""
        return cls._merged_table("renamed")

    @classmethod
    def removed_keys(cls) -> dict[str, str]:
        """Old key -> what to do instead, from this class and every config class it is made of."""
        return cls._merged_table("removed")

    @classmethod
    def _merged_table(cls, name: str) -> dict[str, str]:
        table: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            table.update(vars(klass).get(name, {}))
        return table

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = list(cls.model_fields)
            renamed, removed = cls.renamed_keys(), cls.removed_keys()
            for key in data:
                if key in removed and key not in cls.model_fields:
                    raise PydanticCustomError("removed_key", "{key!r} was removed: {why}",
                                              {"key": str(key), "why": removed[key]})
                if key in renamed and key not in cls.model_fields:
                    raise PydanticCustomError("renamed_key", "{key!r} was renamed: use {new!r}",
                                              {"key": str(key), "new": renamed[key]})
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), fields, n=1)
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {key!r}; valid keys: {valid}",
                        {"key": str(key), "close": close[0] if close else "", "valid": ", ".join(fields)},
                    )
        return data


class _LazyEnum:
    """A JSON-schema enum read from a registry when the schema is generated, not when the class is made:
    plug-ins registered after this module was imported still appear."""

    def __init__(self, registry: Callable[[], Registry], extra: tuple[str, ...]) -> None:
        self.registry, self.extra = registry, extra

    def __call__(self, schema: dict) -> None:
        schema["enum"] = [*self.registry().names(), *self.extra]


def registry_choice(registry: Callable[[], Registry], *extra: str) -> Any:
    """A `str` field type whose valid values are `registry()`'s names (plus `extra`), checked at
    validation with the registry's own "did you mean" message and listed as the JSON schema's enum.
    `registry` is a zero-argument function so that the registry's module is imported only when needed."""

    def check(value: str) -> str:
        if value in extra:
            return value
        registry().get(value)  # raises EdgecvError with the choices
        return value

    return Annotated[str, AfterValidator(_as_value_error(check)), _SchemaHook(_LazyEnum(registry, extra))]


class _SchemaHook:
    """Pydantic hook that lets a field's JSON schema be finished by a callable."""

    def __init__(self, fill: Callable[[dict], None]) -> None:
        self.fill = fill

    def __get_pydantic_json_schema__(self, core_schema, handler):  # noqa: ANN001 - pydantic's protocol
        schema = handler(core_schema)
        self.fill(schema)
        return schema


def _as_value_error(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Pydantic reports ValueError as a validation error at the field's location; EdgecvError is not one."""

    def wrapped(value: Any) -> Any:
        try:
            return check(value)
        except EdgecvError as exc:
            raise ValueError(str(exc)) from None

    return wrapped


# --------------------------------------------------------------------------- one-line messages


def _loc(loc: tuple, prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One message per problem, joined with '; ' so the CLI prints a single line."""
    messages = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        where = _loc(loc, prefix)
        msg, etype = err["msg"], err["type"]
        if etype == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not where or where == "stages":  # stage errors are already formatted with their location
                messages.append(msg)
                continue
            messages.append(f"{where}: {msg}")
            continue
        if etype == "unknown_key":
            ctx = err.get("ctx", {})
            key, close = ctx.get("key", ""), ctx.get("close", "")
            full = f"{where}.{key}" if where else key
            hint = f" (did you mean {(f'{where}.{close}' if where else close)!r}?)" if close else ""
            messages.append(f"unknown key {full!r}{hint}; valid keys there: {ctx.get('valid', '')}")
            continue
        if etype == "renamed_key":
            ctx = err.get("ctx", {})
            old_key, new = ctx.get("key", ""), ctx.get("new", "")
            messages.append(f"{where + '.' if where else ''}{old_key} was renamed: use {where + '.' if where else ''}{new}")
            continue
        if etype == "removed_key":
            ctx = err.get("ctx", {})
            messages.append(f"{where + '.' if where else ''}{ctx.get('key', '')} was removed: {ctx.get('why', '')}")
            continue
        if etype == "missing":
            messages.append(f"missing key {where!r}")
            continue
        got = err.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) and "input" in err else ""
        text = f"{msg[0].lower() + msg[1:] if msg else msg}{got_s}"
        messages.append(f"{where}: {text}" if where else text)
    return "; ".join(messages)


def validate_section(cls: type[Strict], raw: Any, source: str, prefix: str = "") -> Any:
    """`cls.model_validate(raw)` with a one-line EdgecvError naming `source` and the key."""
    try:
        return cls.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise EdgecvError(f"{source}: {format_validation_error(exc, prefix)}") from None


# --------------------------------------------------------------------------- YAML files and overrides


def resolve_recipe_path(spec: str | Path) -> Path:
    """A recipe is a file path, or the name of a bundled recipe (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise EdgecvError(f"recipe {str(spec)!r} is a folder, not a YAML file")
        return path
    bundled = RECIPES_DIR / f"{spec}.yaml"
    if path.suffix == "" and bundled.exists():
        return bundled
    raise EdgecvError(
        f"recipe {str(spec)!r} not found (bundled recipes: {', '.join(list_recipes()) or 'none'})"
    )


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def load_raw(path: Path) -> dict:
    """The YAML mapping in `path` (safe_load), or a one-line error naming the file and the line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgecvError(f"recipe {str(path)!r}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EdgecvError(f"recipe {str(path)!r}: YAML syntax error at{where}: {problem}") from None
    if raw is None:
        raise EdgecvError(f"recipe {str(path)!r} is empty")
    if not isinstance(raw, dict):
        raise EdgecvError(f"recipe {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise EdgecvError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise EdgecvError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to the raw recipe dict. `stages.<i|name>.key=value` reaches a stage."""
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, ".".join(path[: i + 1]))
                continue
            if not isinstance(node, dict):
                raise EdgecvError(f"--set {text!r}: {'.'.join(path[:i])!r} is not a section")
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            raise EdgecvError(f"--set {text!r}: give a key inside the stage, e.g. stages.prune.ratio=0.3")
        if not isinstance(node, dict):
            raise EdgecvError(f"--set {text!r}: {'.'.join(path[:-1])!r} is not a section")
        node[path[-1]] = value
    return raw


def _list_item(items: list, part: str, where: str) -> Any:
    if part.isdigit():
        idx = int(part)
        if idx >= len(items):
            raise EdgecvError(f"--set: {where!r}: there are only {len(items)} stages")
        item = items[idx]
    else:
        matches = [it for it in items if isinstance(it, dict) and part in it]
        if len(matches) != 1:
            names = [next(iter(it)) for it in items if isinstance(it, dict) and it]
            raise EdgecvError(
                f"--set: {where!r}: {'no' if not matches else 'more than one'} stage named {part!r} "
                f"(stages: {', '.join(names) or 'none'}); use its index, e.g. stages.0.ratio"
            )
        item = matches[0]
    if isinstance(item, dict) and len(item) == 1:
        ((name, body),) = item.items()
        if body is None:
            item[name] = body = {}
        return body
    return item

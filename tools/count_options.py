"""Count the recipe's options: every leaf key path of the `Recipe` JSON schema, each stage's config included
(`stages.<name>.<key>`), so that a merge, rename or removal of options shows as a number.

    python tools/count_options.py            # the count, and the top-level keys of each section
    python tools/count_options.py --list     # every leaf key path, one a line
"""

from __future__ import annotations

import sys


def _resolve(node: dict, defs: dict) -> dict:
    """`node` with a `$ref`, or a nullable `anyOf: [X, null]`, replaced by what it points to."""
    while True:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
            continue
        options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1 and ("$ref" in options[0] or "properties" in options[0]):
            node = options[0]
            continue
        return node


def leaf_paths(schema: dict | None = None) -> list[str]:
    """Every leaf key path of the recipe schema: `train.lr`, `stages.prune.ratio`, `stages.qat.distill.alpha`."""
    if schema is None:
        from edgecv.recipe import recipe_schema

        schema = recipe_schema()
    defs = schema.get("$defs", {})
    out: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        node = _resolve(node, defs)
        if prefix == "stages":
            for option in node["items"]["oneOf"]:
                ((name, sub),) = option["properties"].items()
                walk(sub, f"stages.{name}")
            return
        props = node.get("properties")
        if not props:
            out.append(prefix)
            return
        for key, sub in props.items():
            walk(sub, f"{prefix}.{key}" if prefix else key)

    walk(schema, "")
    return out


def main(argv: list[str]) -> int:
    paths = leaf_paths()
    if "--list" in argv:
        print("\n".join(paths))
        return 0
    unique = {p.rsplit(".", 1)[-1] for p in paths}
    print(f"{len(paths)} option key paths ({len(unique)} distinct key names)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

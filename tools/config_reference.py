"""Print the config reference (every key of embedtrain's config tree) as markdown tables.

    python tools/config_reference.py                        # print the tables
    python tools/config_reference.py --write docs/training.md  # replace the block between the markers

The tables are generated from the dataclasses in embedtrain/config.py: the key, the annotation as
written, the dataclass default, and the `# ...` comment of each field (the comment lines directly
above a field, then the one at the end of its line). Mapping settings whose keys have their own
defaults (module-level dicts named `*_DEFAULTS`, e.g. LORA_DEFAULTS for model.lora) get a table each,
with the comments of their entries. docs/training.md holds this output between the markers below, and
tests/test_docs.py checks that it equals the output of this script, so the reference cannot drift
from the code.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def comments_by_line(source):
    """{line number: the text of the `#` comment on that line}, read with the tokenizer (a `#`
    inside a string is not a comment)."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def comment_for(lines, comments, first_line, last_line):
    """The comment lines directly above `first_line` (a block of whole-line comments), then the
    comment at the end of `first_line`..`last_line`, joined with spaces."""
    above = []
    number = first_line - 1
    while number >= 1 and lines[number - 1].strip().startswith("#"):
        above.insert(0, comments[number])
        number -= 1
    trailing = [comments[n] for n in range(first_line, last_line + 1) if n in comments and n not in above]
    return " ".join(part for part in [*above, *trailing] if part)


def number(value):
    text = repr(value)
    if "e" in text:  # 2e-06 -> 2e-6, as a recipe writes it
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def show(value):
    """A default as a recipe or --set writes it (YAML flow style; strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def cell(text):
    return text.replace("|", "\\|").replace("\n", " ")


def code(text):
    return f"`{cell(text)}`"


def field_rows(section_name, cls):
    """One row per dataclass field: (key, type, default, comment)."""
    source_file = inspect.getsourcefile(cls)
    source = Path(source_file).read_text()
    lines, comments = source.splitlines(), comments_by_line(source)
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    instance = cls()
    rows = []
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        name = statement.target.id
        rows.append(
            (
                f"{section_name}.{name}",
                ast.unparse(statement.annotation),
                show(getattr(instance, name)),
                comment_for(lines, comments, statement.lineno, statement.end_lineno),
            )
        )
    return rows


def defaults_assignments(module):
    """(source, statement) of every `NAME_DEFAULTS = {...}` dict that the config module exposes, found
    in the config module's source first, then in the rest of the package (if one moved there)."""
    wanted = {n for n in dir(module) if n.endswith("_DEFAULTS") and isinstance(getattr(module, n), dict)}
    config_file = Path(inspect.getsourcefile(module))
    found = []
    for path in [config_file, *sorted(config_file.parent.rglob("*.py"))]:
        source = path.read_text()
        for statement in ast.parse(source).body:
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id in wanted
                and isinstance(statement.value, ast.Dict)
            ):
                wanted.discard(statement.targets[0].id)
                found.append((source, statement))
    return found


def mapping_defaults(module, settings):
    """Tables for the `NAME_DEFAULTS` dicts: (name, setting key or None, intro comment, rows)."""
    tables = []
    for source, statement in defaults_assignments(module):
        lines, comments = source.splitlines(), comments_by_line(source)
        name = statement.targets[0].id
        values = getattr(module, name)
        field_name = name[: -len("_DEFAULTS")].lower()
        key = next((k for k in settings if k.rsplit(".", 1)[-1] == field_name), None)
        rows = []
        for key_node, value_node in zip(statement.value.keys, statement.value.values):
            entry = ast.literal_eval(key_node)
            rows.append(
                (
                    f"{key}.{entry}" if key else entry,
                    type(values[entry]).__name__ if values[entry] is not None else "",
                    show(values[entry]),
                    comment_for(lines, comments, key_node.lineno, value_node.end_lineno),
                )
            )
        intro = comment_for(lines, comments, statement.lineno, statement.lineno)
        tables.append((name, key, intro, rows))
    return tables


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for key, kind, default, comment in rows:
        out.append(f"| {code(key)} | {code(kind) if kind else ''} | {code(default)} | {cell(comment)} |")
    return out


def reference():
    sys.path.insert(0, str(REPO))
    from embedtrain import config as module

    rows = []
    for key, kind, default, comment in field_rows("", module.Config):
        name = key.lstrip(".")
        section = getattr(module.Config(), name)
        if dataclasses.is_dataclass(section):
            rows += field_rows(name, type(section))
        else:  # a mapping section (deepspeed)
            rows.append((name, kind, default, comment))
    out = [
        "Generated by `python tools/config_reference.py` from `embedtrain/config.py`; the defaults are the",
        "dataclass defaults, which a recipe overrides (`embedtrain/recipes/*.yaml`).",
        "",
        *table(["key", "type", "default", "comment"], rows),
    ]
    for name, key, intro, entries in mapping_defaults(module, [r[0] for r in rows]):
        out += [
            "",
            f"Keys of {code(key) if key else name} (`{name}`; an omitted key takes this default). {cell(intro)}",
        ]
        out += ["", *table(["key", "type", "default", "comment"], entries)]
    if hasattr(module, "DEEPSPEED_KEYS"):
        keys = ", ".join(code(k) for k in module.DEEPSPEED_KEYS)
        out += ["", f"Top-level keys of the DeepSpeed JSON that `deepspeed.<key>` may set (`DEEPSPEED_KEYS`): {keys}."]
    return "\n".join(out) + "\n"


def replace_block(text, block):
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"the markers {START} and {END} are not both there")
    return f"{head}{START}\n{block}{END}{tail}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the block between the markers in this markdown file")
    args = parser.parse_args()
    block = reference()
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), block))
    else:
        sys.stdout.write(block)


if __name__ == "__main__":
    main()

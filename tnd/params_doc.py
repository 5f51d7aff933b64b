"""The params reference table in docs/params.md, generated from the schema so it cannot drift.

    python -m tnd.params_doc            # print the table
    python -m tnd.params_doc --write    # refresh it in docs/params.md (between the markers)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from tnd.config import Params, _allowed
from tnd.io import atomic_write_text

START, END = "<!-- params-table:start -->", "<!-- params-table:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "params.md"


def rows(model: type[BaseModel] = Params, default: BaseModel | None = None, prefix: tuple = ()) -> list[tuple]:
    default = default if default is not None else model()
    out = []
    for name, field in model.model_fields.items():
        value = getattr(default, name)
        loc = prefix + (name,)
        if isinstance(value, BaseModel):
            out.extend(rows(type(value), value, loc))
        else:
            out.append((".".join(loc), json.dumps(value), _allowed(loc)))
    return out


def table() -> str:
    lines = ["| key | default | allowed |", "|---|---|---|"]
    lines += [f"| `{key}` | `{value}` | {allowed} |" for key, value, allowed in rows()]
    return "\n".join(lines)


def replace_in(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the table in docs/params.md")
    args = parser.parse_args()
    if args.write:
        atomic_write_text(PAGE, replace_in(PAGE.read_text()))
    else:
        print(table())


if __name__ == "__main__":
    main()

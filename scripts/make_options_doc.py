"""Write the option reference of docs/options.md from llmrom.config (the one source of every option's text).

    python scripts/make_options_doc.py          # rewrites the part between the markers
"""

import sys
from pathlib import Path

from llmrom.config import OPTION_GROUPS, config_fields

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
BEGIN, END = "<!-- options:begin (scripts/make_options_doc.py writes this) -->", "<!-- options:end -->"


def reference():
    fields = {name: (default, text) for name, default, text in config_fields()}
    parts = []
    for title, names in OPTION_GROUPS.items():
        parts += [f"### {title[0].upper() + title[1:]}", "", "| option | default | what it does |", "|---|---|---|"]
        for name in names:
            default, text = fields[name]
            flag = "--" + name.replace("_", "-")
            if isinstance(default, bool):
                flag += f" / --no-{name.replace('_', '-')}"
            parts.append(f"| `{flag}` | {default} | {text.replace('%%', '%').replace('|', '/')} |")
        parts.append("")
    return "\n".join(parts).rstrip()


def render(text):
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{reference()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    sys.exit(0)

"""Copy a laboratory run's headline figure and summary table into the README (between the lab markers).

    python scripts/update_readme_lab.py runs/lab-<time>

Everything pasted comes from the run's report.json and figures; nothing is typed by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from entrorl.analysis.document import md_escape

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- lab:begin -->", "<!-- lab:end -->"
FIGURES = ("curves.png", "pass_at_k.png")


def markdown_table(table: dict) -> str:
    columns = table["columns"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md_escape(str(row.get(column, ""))) if column == "method" else str(row.get(column, ""))
                                for column in columns) + " |" for row in table["rows"]]
    return "\n".join(lines)


def main(run_dir: str) -> None:
    run = Path(run_dir)
    report = json.loads((run / "report.json").read_text())
    target = ROOT / "docs" / "lab"
    target.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(run / "figures" / name, target / name)
    machine = {row["item"]: row["value"] for row in report["reproduce"]["machine"]["rows"]}
    shown = ("CPU count", "torch", "CPU kernels (torch)", "workers",
             "wall clock, summed over the invocations that ran something (s)")
    body = [
        BEGIN,
        f"From a `{report['preset']}` run (`{report['reproduce']['command']}`): "
        + ", ".join(f"{key} {machine[key]}" for key in shown if key in machine) + ".",
        "",
        *[paragraph + "\n" for paragraph in report["headline"].get("paragraphs", [])],
        "![entropy and reward per step](docs/lab/curves.png)",
        "",
        markdown_table(report["summary"]),
        "",
        "![Pass@k against the base model](docs/lab/pass_at_k.png)",
        END,
    ]
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    (ROOT / "README.md").write_text(readme[:start] + "\n".join(body) + readme[end:])


if __name__ == "__main__":
    main(sys.argv[1])

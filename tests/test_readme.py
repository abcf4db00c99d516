"""The README stays true: its method table equals the registry, its Python examples run."""

from __future__ import annotations

import re
from pathlib import Path

from entrorl.objective import available_methods, methods_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_method_table_matches_registry():
    text = README.read_text(encoding="utf-8")
    assert methods_markdown_table() in text, "README method table is stale: paste methods_markdown_table()"
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M))
    assert {info.name for info in available_methods()} <= listed


def test_the_configuration_reference_matches_the_code():
    """docs/configuration.md lists every key of TrainConfig, with its default and meaning: a key added or changed
    without regenerating it fails here. Every leaf key has a meaning."""
    from entrorl.trainer.config import configuration_markdown

    reference = (README.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference == configuration_markdown(), "stale: write configuration_markdown() to docs/configuration.md"
    rows = re.findall(r"^\| `([a-z_.\[\]]+)` \| [^|]+ \| `[^`]*` \| (.*) \|$", reference, flags=re.M)
    assert len(rows) > 90 and all(meaning.strip() for _, meaning in rows), [key for key, m in rows if not m.strip()]
    assert {"checkpoint.keep", "data.shuffle", "reward.extra[].weight", "model.lora.rank"} <= {key for key, _ in rows}


def test_the_verl_guide_counts_every_method():
    """docs/verl.md says how many methods become verl policy losses (every registered one)."""
    text = (README.parent / "docs" / "verl.md").read_text(encoding="utf-8")
    counts = [int(number) for number in re.findall(r"\ball (\d+)(?:,| methods)", text)]
    assert counts and set(counts) == {len(available_methods())}


def test_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and 0.0 < float(printed[-1]) < 1.0


def test_example_configs_validate():
    from entrorl.trainer import load_config

    examples = sorted((README.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)

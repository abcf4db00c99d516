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


def test_the_migration_guide_names_only_keys_methods_and_parameters_that_exist():
    """docs/migrating.md: every configuration key, `method: X` and `method.params.P` / `advantage.params.P` it names
    is one `entrorl train` reads (a key renamed without the guide following fails here)."""
    from entrorl.advantages import available_advantages
    from entrorl.trainer.config import configuration_markdown

    guide = (README.parent / "docs" / "migrating.md").read_text(encoding="utf-8")
    # the tables' first column, and a key said to be verl's, name TRL's and verl's settings
    ours = re.sub(r"^\| [^|]+ \|", "|", guide, flags=re.M).replace("verl's `", "verl's ")
    keys = set(re.findall(r"^\| `([a-z_.\[\]]+)` \|", configuration_markdown(), flags=re.M))
    sections = {key.split(".")[0] for key in keys}
    named = set(re.findall(r"`((?:" + "|".join(sorted(sections)) + r")\.[a-z_.]+)", ours))
    method_parameters = {name for info in available_methods() for name in info.params}
    estimator_parameters = {name for info in available_advantages() for name in info.params}
    unknown = [key for key in sorted(named) if key not in keys and not (
        key.startswith("method.params.") and key.removeprefix("method.params.") in method_parameters) and not (
        key.startswith("advantage.params.") and key.removeprefix("advantage.params.") in estimator_parameters)]
    assert len(named) > 30 and not unknown, unknown
    methods = {info.name for info in available_methods()}
    for composition in re.findall(r"`method: ([a-z_+]+)`", guide):
        assert set(composition.split("+")) <= methods, composition
    bare_parameters = re.findall(r"`method\.params\.[a-z_]+`, `([a-z_]+)`", guide)
    assert bare_parameters and set(bare_parameters) <= method_parameters, bare_parameters

"""Every ```python block in the README runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_and_its_claims_hold(index, capsys):
    # Each example states what it shows as asserts (the means found, the identity's
    # residual, the gradient's value...), so running it checks what the README claims; an
    # example without one would only show that it runs.
    assert re.search(r"^assert ", BLOCKS[index], flags=re.M), "an example asserts its claims"
    exec(compile(BLOCKS[index], f"README.md[block {index}]", "exec"), {})
    assert capsys.readouterr().out.strip()  # and prints what it shows

"""The documentation's pictures come from the code: the README's gallery is what
``docs/build.py`` writes, the script runs, and the notebooks are stored executed."""

import importlib.util
import re
from pathlib import Path

import matplotlib
import nbformat
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_gallery_is_what_the_script_writes(build):
    readme = (ROOT / "README.md").read_text()
    assert build.gallery_markdown() in readme
    pictures = re.findall(r"!\[[^\]]*\]\((docs/gallery/[^)]+)\)", readme)
    assert sorted(pictures) == sorted(f"docs/gallery/{name}" for name, *_ in build.GALLERY)
    for rel in pictures:
        assert (ROOT / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    assert (ROOT / "docs" / "demo.png").is_file() and "](docs/demo.png)" in readme


def test_the_gallery_script_writes_every_picture(build, tmp_path):
    paths = build.make_gallery(tmp_path, quick=True)
    assert [p.name for p in paths] == [name for name, *_ in build.GALLERY]
    for p in paths:
        img = plt.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.01
    # the script refuses a figure with text over text
    fig, ax = plt.subplots()
    ax.set_title("title")
    ax.text(0.5, 1.01, "over it", transform=ax.transAxes, ha="center", va="bottom")
    with pytest.raises(RuntimeError, match="text over text"):
        build._checked(fig, tmp_path / "bad.png")
    plt.close(fig)
    assert not (tmp_path / "bad.png").exists()


def test_readme_section_is_rewritten_between_the_markers(build, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{build.BEGIN}\nstale\n{build.END}\n\nrest\n")
    build.update_readme(readme)
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nrest\n") and "stale" not in text
    assert build.gallery_markdown() in text


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_notebooks_are_stored_executed_with_their_figures(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "run python docs/build.py"
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts)  # top to bottom, in one kernel
    assert not [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    for c in code:
        draws = re.search(r"plot\.plot_|plt\.subplots", c.source)
        images = [o for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert bool(draws) == bool(images), c.source[:80]

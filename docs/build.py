"""Regenerate the pictures of the documentation from the code, so they cannot drift from it.

    python docs/build.py                  # everything below
    python docs/build.py --no-notebooks   # the gallery, docs/demo.png and the README only

- ``docs/gallery/*.png``: one figure per plot function and command ``--plot``, each checked
  for text over text (:func:`jaxem.plot.overlapping_text`) before it is written;
- ``docs/demo.png``: ``jaxem demo --plot`` (the README's first picture);
- the README's gallery section (between the ``gallery`` markers), from :data:`GALLERY`;
- ``notebooks/*.ipynb``: executed in place, so their stored figures are the code's.

``tests/test_docs.py`` checks that the README's section is what this script writes, that
every picture it names exists, that the script runs, and that the notebooks are stored
executed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GALLERY_DIR = ROOT / "docs" / "gallery"
BEGIN = "<!-- gallery: written by docs/build.py from its GALLERY list; do not edit by hand -->"
END = "<!-- /gallery -->"


def _wine_csv(folder: Path) -> Path:
    """scikit-learn's wine data (178 wines, 13 measurements, the cultivar) as a CSV file
    with a header, as a user would have it."""
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    path = folder / "wine.csv"
    frame.to_csv(path, index=False)
    return path


def _standardised_wine():
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True)
    x = wine.data
    return (x - x.mean()) / x.std(), wine.target.to_numpy()


def _checked(fig, path, save=None) -> None:
    """Save ``fig`` (with ``save``, default :func:`jaxem.plot.save_figure`) unless text on
    it overlaps other text."""
    from jaxem import plot

    overlaps = plot.overlapping_text(fig)
    if overlaps:
        raise RuntimeError(f"{Path(path).name}: text over text: {overlaps}")
    (save or plot.save_figure)(fig, path)


def _command_figure(argv: list[str], path: Path) -> None:
    """Run ``jaxem <argv> --plot path`` in this process, checking the figure it saves."""
    import contextlib
    import io

    from jaxem import cli, plot

    saved = plot.save_figure
    plot.save_figure = lambda fig, p: _checked(fig, p, saved)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([*argv, "--plot", str(path)])
    finally:
        plot.save_figure = saved
    if code != 0:
        raise RuntimeError(f"jaxem {' '.join(argv)} failed with status {code}")


def fit_two_features(path: Path, quick: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        _command_figure(["fit", str(_wine_csv(Path(d))), "-k", "3", "--quiet", "--columns",
                         "flavanoids,color_intensity", "--seed", "1"], path)


def fit_principal_axes(path: Path, quick: bool) -> None:
    import jaxem
    from jaxem import plot

    z, _ = _standardised_wine()
    gm = jaxem.GaussianMixture(3, covariance_type="diag", n_init=1 if quick else 4,
                               random_state=0).fit(z)
    ax = plot.plot_mixture(z, gm.params_, labels=gm.predict(z),
                           title=f"wine, 13 standardised measurements: K=3, diag covariance, "
                                 f"N={len(z)}")
    _checked(ax.figure, path)


def select_criteria(path: Path, quick: bool) -> None:
    import jaxem
    from jaxem import plot

    z, _ = _standardised_wine()
    result = jaxem.select(z.to_numpy(), range(1, 4 if quick else 7), n_init=1 if quick else 4,
                          reg_covar=1e-4)
    axes = plot.plot_criteria(result)
    _checked(axes[0].figure, path)


def em_trace(path: Path, quick: bool) -> None:
    import jax

    from jaxem import gmm, plot
    from jaxem.datasets import load_old_faithful

    x, _ = load_old_faithful()
    x = (x - x.mean(0)) / x.std(0)
    params = gmm.init(jax.random.PRNGKey(3), x, 2, "full", method="random")
    ax = plot.plot_em_trace(plot.em_trace(x, params, 8 if quick else 20))
    _checked(ax.figure, path)


# (file, the call that draws it, what it shows, the function that writes it)
GALLERY = [
    ("fit_two_features.png",
     "jaxem fit wine.csv -k 3 --columns flavanoids,color_intensity --plot fit.png",
     "Two named columns of a CSV file: the axes carry the header's names, the title what "
     "was fitted, the legend what the ellipses are (1σ and 2σ: Mahalanobis distance 1 and "
     "2 from the mean); right, the mean log-likelihood per EM iteration.",
     fit_two_features),
    ("fit_principal_axes.png",
     "plot.plot_mixture(z, gm.params_, labels=gm.predict(z))",
     "Thirteen features seen on the data's top two principal axes (each Gaussian projects "
     "to a Gaussian, covariance Vᵀ Σ V); each axis says the share of the variance it "
     "explains.",
     fit_principal_axes),
    ("select_criteria.png",
     "plot.plot_criteria(jaxem.select(z, range(1, 7), n_init=4))",
     "A model search: one panel per criterion, one line per covariance type, each panel's "
     "minimum circled and the chosen model named; the legend stays out of the data. "
     "`jaxem select --plot` draws the same.",
     select_criteria),
    ("em_trace.png",
     "plot.plot_em_trace(plot.em_trace(x, params, 20))",
     "EM as coordinate ascent: the log-likelihood, the bound the M-step maximised, and the "
     "KL gap between them (log p(x) = ELBO(q) + KL(q ‖ p(z|x))).",
     em_trace),
]


def make_gallery(out_dir: Path = GALLERY_DIR, quick: bool = False) -> list[Path]:
    """Write every figure of :data:`GALLERY` into ``out_dir`` (``quick``: smaller searches,
    for the test suite)."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, _, _, write in GALLERY:
        write(out_dir / name, quick)
        paths.append(out_dir / name)
    return paths


def gallery_markdown() -> str:
    """The README's gallery section, markers included."""
    parts = [BEGIN]
    for name, call, caption, _ in GALLERY:
        rel = (GALLERY_DIR / name).relative_to(ROOT).as_posix()
        parts.append(f"`{call}`\n\n![{name}]({rel})\n\n{caption}\n")
    parts.append(END)
    return "\n\n".join(p.strip("\n") for p in parts)


def update_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{readme} has no gallery markers")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + gallery_markdown() + tail)


def make_demo_png(path: Path = ROOT / "docs" / "demo.png") -> None:
    _command_figure(["demo"], path)


def execute_notebooks(folder: Path = ROOT / "notebooks") -> None:
    import nbformat
    from nbclient import NotebookClient

    for nb_path in sorted(folder.glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        with tempfile.TemporaryDirectory() as work:  # files a notebook writes stay out
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": work}}).execute()
        nbformat.write(nb, nb_path)
        print(f"executed {nb_path.relative_to(ROOT)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-notebooks", action="store_true",
                        help="leave the notebooks as they are")
    args = parser.parse_args(argv)
    np.seterr(all="ignore")
    for path in make_gallery():
        print(f"wrote {path.relative_to(ROOT)}")
    make_demo_png()
    print("wrote docs/demo.png")
    update_readme()
    print("updated the README's gallery section")
    if not args.no_notebooks:
        execute_notebooks()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model report: figures drawn headless, and a Markdown summary that links them."""

import json
import shutil

import matplotlib.image
import numpy as np
import pytest

from jaxcf.cli import report as report_cli
from jaxcf.cli.train import main as train_main
from jaxcf.serving import export, report
from jaxcf.serving.inference import load_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A bias model trained for two epochs on the bundled ml-latest-small (two points per curve)."""
    path = tmp_path_factory.mktemp("bias")
    assert train_main(["--config", "bias.yaml", "--workdir", str(path), "--quiet", "--set", "train.epochs=2"]) == 0
    return path


@pytest.fixture(scope="module")
def written(workdir):
    """Runs the CLI once with the default output folder."""
    assert report_cli.main(["--model", str(workdir)]) == 0
    return workdir / "report"


def assert_real_image(path, min_height=300, min_width=500):
    """A PNG with a drawing in it: big enough, many colours, not one flat fill."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height >= min_height and width >= min_width
    # Pack each RGB(A) pixel into one integer: np.unique over rows of a matrix is slow.
    levels = np.round(pixels * 255).astype(np.int64).reshape(-1, pixels.shape[-1])
    packed = levels @ (256 ** np.arange(levels.shape[1], dtype=np.int64))
    assert len(np.unique(packed)) > 50
    # Mostly white background, but a real share of ink.
    ink = np.mean(pixels[..., :3].min(axis=-1) < 0.9)
    assert 0.01 < ink < 0.9


def test_report_writes_three_figures_and_links_them(written):
    for name in ("curves.png", "embeddings_pca.png", "item_bias.png"):
        assert_real_image(written / name)
    text = (written / "report.md").read_text()
    for name in ("curves.png", "embeddings_pca.png", "item_bias.png"):
        assert f"]({name})" in text


def test_summary_states_the_logged_metrics(workdir, written):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    text = (written / "report.md").read_text()
    assert len(records) == 2
    assert f"validation RMSE **{records[-1]['valid_rmse']:.4f}**" in text
    assert "metrics.jsonl" in text


def test_summary_bias_tables_follow_the_model(workdir, written):
    model = load_model(workdir)
    top = model.bias_ranking("item", 5, min_ratings=report.BIAS_MIN_RATINGS)
    text = (written / "report.md").read_text()
    for rank, (raw, title, bias) in enumerate(zip(top.ids.tolist(), top.titles, top.scores.tolist()), 1):
        assert f"| {rank} | {raw} | {bias:.3f} | {title} |" in text


def test_export_alone_uses_the_metrics_in_metadata(workdir, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(workdir / "model", folder)
    assert report_cli.main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert_real_image(tmp_path / "out" / "curves.png")
    assert "Per-epoch metrics from `metadata.json`" in (tmp_path / "out" / "report.md").read_text()


def test_pca_is_the_top_two_principal_components():
    rng = np.random.default_rng(0)
    # Variance 9 along one axis, 4 along another, tiny noise on the rest.
    vectors = rng.normal(size=(2000, 5)) * np.array([3.0, 2.0, 0.01, 0.01, 0.01])
    coords, explained = report.pca_2d(vectors)
    assert coords.shape == (2000, 2)
    # Against the eigenvectors of the covariance matrix (each component is defined up to its sign).
    centred = vectors - vectors.mean(axis=0)
    values, vectors_ = np.linalg.eigh(np.cov(centred, rowvar=False))
    for component in range(2):
        expected = centred @ vectors_[:, -1 - component]
        sign = np.sign(expected @ coords[:, component])
        np.testing.assert_allclose(coords[:, component], sign * expected, atol=1e-9)
    np.testing.assert_allclose(explained, values[::-1][:2] / values.sum(), rtol=1e-9)
    np.testing.assert_allclose(explained, [9 / 13, 4 / 13], atol=0.02)


def test_short_titles_keep_the_year():
    assert report.short_title("Lord of the Rings: The Return of the King, The (2003)", "x") == (
        "Lord of the Rings: The R… (2003)"
    )
    assert report.short_title("Toy Story (1995)", "x") == "Toy Story (1995)"
    assert report.short_title(None, "item 7") == "item 7"


def test_dot_model_report_has_no_bias_figure(tmp_path):
    rng = np.random.default_rng(1)
    folder = export.write(
        tmp_path / "run",
        params={"user_embedding": rng.normal(size=(4, 3)), "item_embedding": rng.normal(size=(30, 3))},
        user_ids=np.arange(4),
        item_ids=np.arange(100, 130),
        train_users=rng.integers(0, 4, 200),
        train_items=rng.integers(0, 30, 200),
        config={},
        model_info={"kind": "dot", "n_factors": 3, "y_range": None, "num_users": 4, "num_items": 30},
        data_info={"source": "hand-made"},
        metrics=[{"epoch": 1, "train_loss": 2.0, "valid_mse": 1.5, "valid_rmse": 1.2247}],
    )
    assert report_cli.main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "item_bias.png").exists()
    assert_real_image(tmp_path / "out" / "embeddings_pca.png")
    assert "no bias ranking" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("metrics, stated", [
    ([{"epoch": 1, "train_loss": 2.0, "test_mse": 1.44, "test_rmse": 1.2}], "test RMSE **1.2000**"),
    ([{"epoch": 1, "train_loss": 2.0}], "nothing held out"),
])
def test_a_run_without_a_validation_part_is_reported_on_what_it_has(tmp_path, metrics, stated):
    """A named fold's run (its test part only) or one trained on every row (nothing held out): the
    report states what was scored (it raised KeyError 'valid_rmse' before)."""
    rng = np.random.default_rng(1)
    folder = export.write(
        tmp_path / "run",
        params={"user_embedding": rng.normal(size=(4, 3)), "item_embedding": rng.normal(size=(30, 3))},
        user_ids=np.arange(4), item_ids=np.arange(100, 130), train_users=rng.integers(0, 4, 200),
        train_items=rng.integers(0, 30, 200), config={},
        model_info={"kind": "dot", "n_factors": 3, "y_range": None, "num_users": 4, "num_items": 30},
        data_info={"source": "hand-made"}, metrics=metrics,
    )
    assert report_cli.main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert stated in (tmp_path / "out" / "report.md").read_text()
    assert_real_image(tmp_path / "out" / "curves.png")


def test_implicit_model_report_states_its_ranking_metrics(tmp_path):
    from jaxcf.cli import train

    assert train.main(["--config", "ials.yaml", "--quiet", "--workdir", str(tmp_path / "run"), "--set",
                       "data.name=ml-100k", "model.n_factors=8", "train.epochs=2"]) == 0
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert report_cli.main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"NDCG@20 **{last['ndcg@20']:.4f}**" in text and "RMSE" not in text
    assert_real_image(tmp_path / "out" / "curves.png")


def test_missing_model_exits_2(tmp_path, capsys):
    assert report_cli.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1

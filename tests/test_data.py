"""Data: the bundled dataset, id maps, the split, CSV loading and every bad-data rejection."""

import gzip
import hashlib

import numpy as np
import pandas as pd
import pytest

from jaxcf import config as cfg
from jaxcf import data
from jaxcf.cli.train import main
from jaxcf.data import registry

SHARED = registry.BUNDLED_DIR


def test_bundled_dataset_has_the_notebook_shape(bundled):
    r = bundled.ratings
    assert (len(r), r.num_users, r.num_items) == (100_004, 671, 9066)
    assert r.rating_range == (0.5, 5.0)
    assert r.users.dtype == np.int32 and r.items.dtype == np.int32 and r.ratings.dtype == np.float32
    assert len(bundled.split.train) == 80_004 and len(bundled.split.valid) == 20_000
    # notebook head(): user 1 rated movie 31 with 2.5 first
    assert r.user_ids.raw[0] == 1 and r.item_ids.raw[0] == 31 and r.ratings[0] == 2.5
    assert bundled.titles[1] == "Toy Story (1995)"


def test_bundled_files_match_the_grouplens_checksums():
    # The same digests as shared/data/SHA256SUMS (PROVENANCE.md), of the uncompressed bytes.
    payload = registry.read_bundled("ml-latest-small-2016", "ratings.csv")
    assert hashlib.sha256(payload).hexdigest() == "821795331fd974bbe7a8416f2a7eec2b548a485dedb47a073580b0a9a8a0a8d2"
    assert (SHARED / "ml-latest-small-2016" / "README.txt").read_text().count("GroupLens") > 3


def test_damaged_bundled_file_is_detected(tmp_path, monkeypatch):
    folder = tmp_path / "ml-latest-small-2016"
    folder.mkdir()
    (folder / "SHA256SUMS").write_text((SHARED / "ml-latest-small-2016" / "SHA256SUMS").read_text())
    (folder / "ratings.csv.gz").write_bytes(gzip.compress(b"userId,movieId,rating\n1,2,3\n"))
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path)
    with pytest.raises(data.DataError, match="fails its sha256 check"):
        registry.read_bundled("ml-latest-small-2016", "ratings.csv")


def test_id_maps_follow_first_appearance_like_the_notebook(bundled):
    frame = pd.read_csv(gzip.open(SHARED / "ml-latest-small-2016" / "ratings.csv.gz"))
    # The notebook's own (slow) construction, on the real file.
    user2idx = {k: i for i, k in enumerate(frame["userId"].unique())}
    movie2idx = {k: i for i, k in enumerate(frame["movieId"].unique())}
    r = bundled.ratings
    np.testing.assert_array_equal(r.users, frame["userId"].map(user2idx).to_numpy())
    np.testing.assert_array_equal(r.items, frame["movieId"].map(movie2idx).to_numpy())
    idx, known = r.item_ids.lookup([31, "1029", 999999999, "x"])
    assert idx.tolist()[:2] == [movie2idx[31], movie2idx[1029]] and known.tolist() == [True, True, False, False]


def test_split_is_exactly_the_seeded_notebook_split(bundled):
    n = 100_004
    perm = np.random.RandomState(42).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[: int(n * 0.2)]] = True
    np.testing.assert_array_equal(bundled.split.valid, np.flatnonzero(mask))
    np.testing.assert_array_equal(bundled.split.train, np.flatnonzero(~mask))
    other = data.random_split(n, 0.2, seed=7)
    assert not np.array_equal(other.valid, bundled.split.valid)


def test_ml100k_official_splits_are_exact():
    u1 = data.load(cfg.DataConfig(name="ml-100k", split="u1"), seed=0)
    assert (len(u1.ratings), u1.ratings.num_users, u1.ratings.num_items) == (100_000, 943, 1682)
    # The fold's .test part is a test set (scored, never choosing anything); nothing is validated.
    assert (len(u1.split.train), len(u1.split.valid), len(u1.split.test)) == (80_000, 0, 20_000)
    # u1.base, rebuilt from u.data minus u1.test in (user, item) order, is byte for byte the official file.
    r = u1.ratings
    rows = u1.split.train
    frame = pd.DataFrame(
        {"u": r.user_ids.raw[r.users[rows]], "i": r.item_ids.raw[r.items[rows]], "row": rows}
    ).sort_values(["u", "i"])
    raw = registry._ml100k_frame(registry.read_bundled("ml-100k", "u.data")).iloc[frame["row"].to_numpy()]
    text = "".join(f"{a}\t{b}\t{c}\t{d}\n" for a, b, c, d in raw.itertuples(index=False))
    expected = dict(line.split()[::-1] for line in (SHARED / "ml-100k" / "SHA256SUMS").read_text().splitlines())
    official = "ce253ec86c448b44fb3ba9a30d12dcfc2e9210cbde71efada3730c22e9ac212a"  # u1.base in PROVENANCE.md
    assert hashlib.sha256(text.encode()).hexdigest() == official
    assert expected["u1.test"] == "18c6014a4b2c7324f250a63f8904a7b16b2b19f911129e346141507b0cbac950"
    with pytest.raises(data.DataError, match="unknown ml-100k split"):
        data.load(cfg.DataConfig(name="ml-100k", split="u9"), seed=0)


def test_any_csv_with_custom_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("who,what,score,extra\nalice,m1,4.5,x\nbob,m2,3,y\nalice,m2,1,z\ncarol,m3,2,w\nbob,m1,5,v\n")
    c = cfg.DataConfig(path=str(path), user_col="who", item_col="what", rating_col="score", valid_fraction=0.4)
    ds = data.load(c, seed=42)
    assert ds.ratings.user_ids.raw.tolist() == ["alice", "bob", "carol"]
    assert ds.ratings.users.tolist() == [0, 1, 0, 2, 1]
    assert len(ds.split.valid) == 2 and len(ds.split.train) == 3


def test_gzip_csv_is_read(tmp_path):
    path = tmp_path / "r.csv.gz"
    path.write_bytes(gzip.compress(b"userId,movieId,rating\n1,10,4\n2,10,3\n1,11,5\n2,12,1\n3,10,2\n"))
    ratings = data.load_csv(path)
    assert len(ratings) == 5 and ratings.num_items == 3


def test_duplicate_pairs_are_kept(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("userId,movieId,rating\n1,10,4\n1,10,2\n")
    ratings = data.load_csv(path)
    assert len(ratings) == 2 and ratings.num_users == 1 and ratings.num_items == 1


BAD_FILES = {
    "empty": (b"", "file is empty"),
    "header only": (b"userId,movieId,rating\n", "no ratings"),
    "missing column": (b"userId,movieId,stars\n1,2,3\n", "missing column(s) rating"),
    "wrong delimiter": (b"userId;movieId;rating\n1;2;3\n", "delimiter"),
    "ragged rows": (b"userId,movieId,rating\n1,2,3\n4,5\n", "cannot parse CSV"),
    "not utf-8": (b"userId,movieId,rating\n1,\xff\xfe,3\n", "UTF-8"),
    "missing id": (b"userId,movieId,rating\n1,2,3\n,5,4\n", "missing userId id in data row 2"),
    "non-numeric rating": (b"userId,movieId,rating\n1,2,3\n1,3,good\n", "is not numeric (data row 2"),
    "nan rating": (b"userId,movieId,rating\n1,2,3\n1,3,nan\n", "must be finite"),
    "infinite rating": (b"userId,movieId,rating\n1,2,3\n1,3,inf\n", "must be finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_rejected_with_one_line(case, tmp_path):
    payload, message = BAD_FILES[case]
    path = tmp_path / "bad.csv"
    path.write_bytes(payload)
    with pytest.raises(data.DataError) as info:
        data.load_csv(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.load_csv(tmp_path / "nope.csv")
    with pytest.raises(data.DataError, match="is a directory"):
        data.load_csv(tmp_path)


def test_ratings_outside_the_declared_range(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,rating\n1,2,3\n1,3,7\n")
    with pytest.raises(data.DataError, match=r"rating 7.0 in data row 2 is outside data.rating_range \[0.5, 5.0\]"):
        data.load_csv(path, rating_range=(0.5, 5.0))


def test_too_few_ratings_to_split():
    with pytest.raises(data.DataError, match="too few ratings to split"):
        data.random_split(3, 0.2, seed=0)


@pytest.mark.parametrize(
    "payload, overrides, message",
    [
        (None, [], "file not found"),
        (b"", [], "file is empty"),
        (b"userId,movieId,stars\n1,2,3\n", [], "missing column"),
        (b"userId,movieId,rating\n1,2,x\n2,3,4\n", [], "not numeric"),
        (b"userId,movieId,rating\n1,2,nan\n2,3,4\n", [], "finite"),
        (b"userId,movieId,rating\n1,2,3\n", [], "too few ratings"),
        # Every rating identical: the biased model's (min, max) range would be empty.
        (b"userId,movieId,rating\n" + b"".join(b"%d,%d,4\n" % (i, i) for i in range(10)), [], "y_range"),
        (b"userId,movieId,rating\n1,2,3\n", ["data.path=null", "data.name=ml-99m"], "not a known dataset"),
    ],
)
def test_cli_bad_data_exits_2_writing_nothing(payload, overrides, message, tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    if payload is not None:
        path.write_bytes(payload)
    workdir = tmp_path / "run"
    argv = ["--config", "bias.yaml", "--set", f"data.path={path}", *overrides]
    code = main([*argv, "--workdir", str(workdir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not workdir.exists()

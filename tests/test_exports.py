"""Exports as untrusted input and across versions: every field that changes an answer is covered by a checksum,
a reader never sees a half-replaced export, and exports written by earlier versions still load and answer as
they did."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import jaxcf
from jaxcf.core.errors import JaxcfError, ModelError
from jaxcf.serving import export

EXPORTS = Path(__file__).parent / "data" / "exports"
KINDS = ("bias", "dot", "ensemble", "bpmf", "ials", "bpr", "ease", "blend")


def _answers(model, record):
    predicted = model.predict(record["users"], record["items"])
    return predicted.ratings, predicted.fallback.tolist(), model.recommend(1, k=5).ids.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_exports_of_format_2_still_load_and_answer_as_they_did(kind, tmp_path):
    """Committed exports written before the metadata digest (tests/data/make_exports.py)."""
    folder = EXPORTS / "format2" / kind
    record = json.loads((EXPORTS / "format2" / f"{kind}.answers.json").read_text())
    model = jaxcf.load_model(folder)
    assert model.export.unverified == export.UNVERIFIED_V2  # says what nothing verifies
    ratings, fallback, top = _answers(model, record)
    np.testing.assert_allclose(ratings, record["predictions"], rtol=0, atol=1e-6)
    assert fallback == record["fallback"] and top == record["recommend_1"]
    # Saved again, it is the current format: verified, and answering the same.
    again = jaxcf.load_model(model.save(tmp_path / "again"))
    assert again.export.unverified == () and again.metadata["format_version"] == export.FORMAT_VERSION
    np.testing.assert_array_equal(_answers(again, record)[0], ratings)


@pytest.fixture(scope="module")
def ials_export(tmp_path_factory):
    """A small implicit-feedback export of the current format (its metadata has threshold, alpha, ...)."""
    folder = tmp_path_factory.mktemp("ials") / "model"
    jaxcf.load_model(EXPORTS / "format2" / "ials").save(folder)
    return folder


def test_no_bit_flip_in_metadata_changes_an_answer(ials_export, tmp_path):
    """Single-bit flips all over metadata.json (a sample of 600 of them): each is refused with one line, or
    parses to the same JSON (a flip that JSON ignores); none loads and answers differently."""
    original = (ials_export / "metadata.json").read_bytes()
    meaning = json.loads(original)
    rng = np.random.default_rng(0)
    target = tmp_path / "model"
    shutil.copytree(ials_export, target)
    refused = same = 0
    for position in rng.choice(len(original) * 8, 600, replace=False):
        flipped = bytearray(original)
        flipped[position // 8] ^= 1 << (position % 8)
        (target / "metadata.json").write_bytes(bytes(flipped))
        try:
            loaded = jaxcf.load_model(target)
        except ModelError as err:
            assert "\n" not in str(err)
            refused += 1
            continue
        assert loaded.metadata == meaning, f"bit {position} changed the metadata and loaded"
        same += 1
    assert refused > 500 and refused + same == 600


@pytest.mark.parametrize("section, key, value", [
    ("model", "feedback", "explicit"), ("data", "implicit_threshold", 1.0), ("config", "implicit", {"alpha": 99.0}),
    ("metrics", None, [{"valid_mse": 0.01}]),
])
def test_editing_an_answer_changing_field_is_refused(ials_export, tmp_path, section, key, value):
    target = tmp_path / "model"
    shutil.copytree(ials_export, target)
    metadata = json.loads((target / "metadata.json").read_text())
    if key is None:
        metadata[section] = value
    else:
        metadata[section][key] = value
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2))
    with pytest.raises(ModelError, match="metadata.json was changed after export"):
        jaxcf.load_model(target)


def test_a_reader_sees_the_old_export_or_the_new_one_whole(ials_export, tmp_path):
    """One thread re-exports two different models over one folder while another loads it: every load
    succeeds and answers as one of the two."""
    first = jaxcf.load_model(ials_export)
    second = jaxcf.load_model(EXPORTS / "format2" / "bpr")
    folder = tmp_path / "served"
    first.save(folder)
    answers = [first.scores([1])[0], second.scores([1])[0]]
    assert not np.array_equal(*answers)  # two models that answer differently
    stop = threading.Event()
    failures: list = []

    def writer():
        k = 0
        while not stop.is_set():
            (first if k % 2 else second).save(folder)
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    loads = 0
    try:
        for _ in range(150):
            try:
                scores = jaxcf.load_model(folder).scores([1])[0]
            except JaxcfError as err:
                failures.append(str(err))
                continue
            loads += 1
            assert any(np.array_equal(scores, a) for a in answers), "a load mixed two exports"
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert loads == 150

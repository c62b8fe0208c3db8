"""The embedded tiny model: the shipped weights are the ones recorded, and every build of the recipe is in the band.

The shipped weights make every number identical on every machine; the band (``embedded.band_problems``)
is what the tests and the demo rely on, asserted on the shipped weights *and* on a fresh build of the recipe, so a
recipe that only worked on one CPU fails here.
"""

from __future__ import annotations

import json
import shutil

import pytest

from embedded import shipped
from embedded import tiny as embedded


def test_shipped_model_files_match_their_recorded_hashes():
    path = embedded.tiny_model_path()
    assert path == embedded.SHIPPED_DIR
    info = json.loads((path / shipped.INFO_FILE).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "cotune.json"} <= set(info["sha256"])
    assert info["recipe"]["seed"] == embedded.SHIPPED_SEED


def test_a_changed_or_missing_shipped_file_is_a_clear_error(tmp_path, monkeypatch):
    original = embedded.SHIPPED_DIR
    copy = embedded.ship_tiny_model(original, tmp_path / "m")
    assert (copy / "cotune.json").read_bytes() == (original / "cotune.json").read_bytes()
    monkeypatch.setattr(embedded, "SHIPPED_DIR", copy)
    assert embedded.tiny_model_path() == copy
    with open(copy / "model.safetensors", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(shipped.EmbeddedModelError, match="model.safetensors.*differs from the sha256"):
        embedded.tiny_model_path()
    shutil.rmtree(copy)
    with pytest.raises(shipped.EmbeddedModelError, match="missing"):
        embedded.tiny_model_path()


def test_band_problems_name_what_is_out_of_band():
    from programs.tasks.last_digit import Measurement

    good = {"greedy": Measurement(500, 1.0, 0.45, 0.9, 0.25), "sampled": Measurement(500, 1.0, 0.5, 0.8, 0.35),
            "demos": Measurement(500, 1.0, 0.8, 0.8, 0.8), "cot": Measurement(500, 1.0, 0.4, 0.5, 0.3)}
    assert embedded.band_problems(good) == []
    always_right = dict(good, greedy=Measurement(500, 1.0, 0.95, 0.95, 0.95))
    problems = embedded.band_problems(always_right)
    assert any("greedy accuracy 95.0% outside" in p for p in problems)
    assert any("short numbers" in p for p in problems)


@pytest.mark.slow
def test_shipped_model_is_in_the_band_on_500_held_out_questions():
    measured = embedded.measure_band(embedded.tiny_model_path(), 500)
    for arm, m in measured.items():
        print(f"shipped {arm:8s} {m}")
    assert embedded.band_problems(measured) == []


@pytest.mark.slow
def test_a_rebuild_from_the_recipe_lands_in_the_same_band(tmp_path, monkeypatch):
    """The recipe is the source of the shipped weights: a build on this machine must be the same kind of model."""
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path))
    path = embedded.tiny_model_path(from_recipe=True)
    assert path.parent.parent == tmp_path and path != embedded.SHIPPED_DIR
    measured = embedded.measure_band(path, 500)
    for arm, m in measured.items():
        print(f"rebuilt {arm:8s} {m}")
    assert embedded.band_problems(measured) == []

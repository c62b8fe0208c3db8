"""metrics.references: the one module:attr loader (trusted code vs references read from a file) and namer."""

from __future__ import annotations

import sys

import pytest

from metrics.references import ReferenceImportError, import_reference, load_reference, reference_name
from metrics.rubric import Rubric


def test_a_name_loads_back_to_its_object():
    assert reference_name(Rubric) == "metrics.rubric:Rubric"
    assert load_reference(reference_name(Rubric)) is Rubric
    assert import_reference("metrics.rubric:Rubric.reward") is Rubric.reward  # dotted attributes walk


@pytest.mark.parametrize("spec, problem", [
    ("metrics.rubric", "not a reference of the form"),
    ("metrics rubric:Rubric", "not a reference of the form"),
    ("metrics.rubric:Nope", "metrics.rubric has no attribute 'Nope'"),
    ("cotune_no_such_package:x", "cannot import 'cotune_no_such_package:x'"),
])
def test_both_loaders_refuse_bad_references_naming_them(spec, problem):
    for loader in (load_reference, import_reference):
        with pytest.raises(ReferenceImportError, match=problem):
            loader(spec)


@pytest.mark.parametrize("spec", ["os:system", "builtins:exec", "subprocess:getoutput"])
def test_a_reference_read_from_a_file_never_names_the_standard_library(spec):
    with pytest.raises(ReferenceImportError, match="standard library"):
        import_reference(spec)


def test_a_reference_read_from_a_file_never_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cotune_beside_me.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python script.py` run here would put it
    with pytest.raises(ReferenceImportError, match="current directory.*PYTHONPATH"):
        import_reference("cotune_beside_me:x")
    assert "cotune_beside_me" not in sys.modules
    assert str(tmp_path) in sys.path  # put back after the import

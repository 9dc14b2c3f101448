"""Label mappings between label sets: the built-in specs' real vocabularies, one-to-one pairs only."""

from __future__ import annotations

import pytest

from cxr import labelmap, labels
from cxr.data import spec

CHEXPERT = spec.load("chexpert")[0].labels.names
PADCHEST = spec.load("padchest")[0].labels.names
CSV = spec.load("csv")[0].labels.names


def test_nih_to_chexpert_pairs_the_seven_shared_findings_in_the_models_order():
    assert labelmap.shared(labels.FINDINGS, CHEXPERT) == [
        ("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"), ("Effusion", "Pleural Effusion"),
        ("Pneumonia", "Pneumonia"), ("Pneumothorax", "Pneumothorax"), ("Consolidation", "Consolidation"),
        ("Edema", "Edema")]
    assert labelmap.unmatched(labels.FINDINGS, CHEXPERT) == ["Infiltration", "Mass", "Nodule", "Emphysema",
                                                             "Fibrosis", "Pleural_Thickening", "Hernia"]
    assert spec.load("mimic-cxr-jpg")[0].labels.names == CHEXPERT  # the same labeller, the same pairs


def test_nih_and_padchest_share_all_fourteen():
    pairs = labelmap.shared(labels.FINDINGS, PADCHEST)
    assert len(pairs) == 14 and [m for m, _ in pairs] == list(labels.FINDINGS)
    assert dict(pairs)["Effusion"] == "pleural effusion" and dict(pairs)["Edema"] == "pulmonary edema"
    assert dict(pairs)["Pleural_Thickening"] == "pleural thickening" and dict(pairs)["Hernia"] == "hiatal hernia"
    assert labelmap.unmatched(PADCHEST, labels.FINDINGS) == []


def test_the_csv_template_uses_nih_spellings_and_chexpert_maps_back_in_its_own_order():
    assert labelmap.shared(CSV, labels.FINDINGS) == [(n, n) for n in CSV]
    assert labelmap.shared(CHEXPERT, CSV) == [("Cardiomegaly", "Cardiomegaly"), ("Edema", "Edema"),
                                              ("Pneumonia", "Pneumonia"), ("Atelectasis", "Atelectasis"),
                                              ("Pneumothorax", "Pneumothorax"), ("Pleural Effusion", "Effusion")]


def test_names_match_ignoring_case_and_spacing_even_outside_the_groups():
    assert labelmap.shared(["Support Devices", "EFFUSION"], ["support  devices", "Pleural effusion"]) == [
        ("Support Devices", "support  devices"), ("EFFUSION", "Pleural effusion")]


def test_broader_labels_are_never_shared_and_the_reason_says_so():
    assert labelmap.shared(["Mass", "Nodule"], ["Lung Lesion"]) == []
    why = labelmap.reasons(["Mass", "Nodule", "Hernia", "Lung Opacity"], CHEXPERT)
    assert "Lung Lesion" in why["Mass"] and "Lung Opacity" in why["Nodule"] and "not equivalent" in why["Mass"]
    assert why["Hernia"] == "no equivalent in the data's label set"
    assert "covers" in labelmap.reasons(["Lung Opacity"], ["Consolidation"])["Lung Opacity"]
    assert labelmap.covered_by("lung lesion") == ("Mass", "Nodule") and labelmap.covered_by("Edema") == ()


def test_two_names_for_one_finding_on_either_side_is_not_one_to_one():
    assert labelmap.shared(["Effusion"], ["Pleural Effusion", "pleural effusion"]) == []
    assert labelmap.shared(["Effusion", "Pleural Effusion"], ["pleural effusion", "Edema"]) == []
    assert "not one-to-one" in labelmap.reasons(["Effusion"], ["Pleural Effusion", "pleural effusion"])["Effusion"]


def test_a_name_in_two_groups_or_both_broader_and_equivalent_is_refused():
    with pytest.raises(ValueError, match="'pleural effusion' is in groups 'a' and 'b'"):
        labelmap.parse("equivalent:\n - {finding: a, nih: Effusion, chexpert: Pleural Effusion}\n"
                       " - {finding: b, padchest: pleural effusion}\n")
    with pytest.raises(ValueError, match="'lung lesion' is both broader"):
        labelmap.parse("equivalent: [{finding: l, chexpert: Lung Lesion}]\nbroader: {Lung Lesion: [Mass]}\n")
    with pytest.raises(ValueError, match=r"equivalent.0: unknown key\(s\) \['mimic'\]"):
        labelmap.parse("equivalent: [{finding: l, mimic: Edema}]\n")
    assert labelmap.parse("equivalent: [{finding: e, nih: Effusion, padchest: pleural effusion}]\n").groups == {
        "effusion": "e", "pleural effusion": "e"}

"""The loss-term grammar (codetr/models/loss_terms.py): hand-written names parse into their parts and back."""
import pytest

from codetr.engine.progress import summarize_terms
from codetr.models.loss_terms import TermName, aux_term, is_loss_term, layer_term, parse_term, posq_term


@pytest.mark.parametrize("name, parts", [
    ("dec.d5.loss_cls", TermName("dec", "loss_cls", layer=5)),
    ("enc.loss_giou", TermName("enc", "loss_giou")),
    ("dn.d0.loss_bbox", TermName("dn", "loss_bbox", layer=0)),
    ("o2m.d2.loss_cls", TermName("o2m", "loss_cls", layer=2)),
    ("grp.d1.loss_giou", TermName("grp", "loss_giou", layer=1)),
    ("aux.faster_rcnn.loss_rpn_cls", TermName("aux", "loss_rpn_cls", head="faster_rcnn")),
    ("posq.atss_2.d3.loss_bbox", TermName("posq", "loss_bbox", layer=3, head="atss_2")),
])
def test_names_parse_into_their_parts_and_back(name, parts):
    assert parse_term(name) == parts and str(parts) == name and is_loss_term(name)


def test_builders_write_the_grammar():
    assert layer_term("o2m", 4, "loss_cls") == "o2m.d4.loss_cls"
    assert aux_term("atss", "loss_centerness") == "aux.atss.loss_centerness"
    assert posq_term("gfl", 0, "loss_giou") == "posq.gfl.d0.loss_giou"


@pytest.mark.parametrize("name", ["loss", "lr", "time", "dec.loss_cls", "dec.dx.loss_cls", "aux.atss", "foo.d1.loss_cls",
                                  "posq.atss.loss_cls"])
def test_other_names_are_not_loss_terms(name):
    assert not is_loss_term(name)
    with pytest.raises(ValueError, match="not a loss term"):
        parse_term(name)


def test_progress_summary_counts_every_group_by_type():
    record = {"loss": 9.0, "dec.d0.loss_cls": 1.0, "dn.d0.loss_cls": 2.0, "o2m.d1.loss_cls": 0.5,
              "aux.faster_rcnn.loss_rpn_cls": 0.25, "posq.atss.d0.loss_bbox": 4.0, "lr": 1e-4}
    assert summarize_terms(record) == {"loss": 9.0, "cls": 3.5, "rpn_cls": 0.25, "bbox": 4.0}

"""Co-DETR auxiliary heads: one module per head kind (see codetr.models.co_detr.model.build_aux_head)."""

"""Checkpoint conversion from other frameworks (mmdetection 3.x, Sense-X/Co-DETR) to codetr."""

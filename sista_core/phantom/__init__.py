"""Phantom frontal chest radiographs rendered from report findings, with exact masks and
boxes: the images of the project's embedded default benchmark (the text is real Open-I, the
images are synthetic)."""

from .placement import RADIOGRAPH_LUNG_BOX, Placement
from .render import Phantom, render

__all__ = ["RADIOGRAPH_LUNG_BOX", "Phantom", "Placement", "render"]

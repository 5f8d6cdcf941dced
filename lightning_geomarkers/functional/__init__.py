"""Pure functions: the math layer (no Lightning, no state). Everything else in the package calls these."""

from lightning_geomarkers.functional.glue import GLUE_MARKERS, GlueResult, glue, make_dichotomies

__all__ = ["GLUE_MARKERS", "GlueResult", "glue", "make_dichotomies"]

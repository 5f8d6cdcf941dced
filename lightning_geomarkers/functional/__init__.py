"""Pure functions: the math layer (no Lightning, no state). Everything else in the package calls these.

GLUE markers (``glue``, ``glue_pairs``, ``glue_joint``, ``simulated_capacity``), the other geometry
markers, and the explicit preprocessing helpers. Inputs are validated here, at the boundary.
"""

from lightning_geomarkers.functional.distances import within_class_distance
from lightning_geomarkers.functional.glue import GLUE_MARKERS, GlueResult, glue, make_dichotomies
from lightning_geomarkers.functional.intrinsic_dimension import local_intrinsic_dimension
from lightning_geomarkers.functional.neural_collapse import neural_collapse
from lightning_geomarkers.functional.per_class import PerClassGlue, pairwise_matrix, per_class_glue
from lightning_geomarkers.functional.preprocessing import center, per_class_subsample, random_projection
from lightning_geomarkers.functional.protocols import GluePairsResult, glue_joint, glue_pairs
from lightning_geomarkers.functional.simulated_capacity import SimulatedCapacity, simulated_capacity
from lightning_geomarkers.functional.spectral import (
    effective_rank,
    feature_spectrum,
    numerical_rank,
    participation_ratio,
)
from lightning_geomarkers.functional.suite import MARKERS, MarkerInfo, MarkerReport, geometry_markers
from lightning_geomarkers.functional.uncertainty import (
    glue_standard_errors,
    jackknife_standard_errors,
    pairs_standard_errors,
)

__all__ = [
    "GLUE_MARKERS",
    "MARKERS",
    "MarkerInfo",
    "MarkerReport",
    "geometry_markers",
    "GluePairsResult",
    "GlueResult",
    "SimulatedCapacity",
    "center",
    "effective_rank",
    "feature_spectrum",
    "glue",
    "glue_joint",
    "glue_pairs",
    "glue_standard_errors",
    "jackknife_standard_errors",
    "local_intrinsic_dimension",
    "make_dichotomies",
    "neural_collapse",
    "numerical_rank",
    "pairs_standard_errors",
    "participation_ratio",
    "PerClassGlue",
    "pairwise_matrix",
    "per_class_glue",
    "per_class_subsample",
    "random_projection",
    "simulated_capacity",
    "within_class_distance",
]

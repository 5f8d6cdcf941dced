"""The bottom layer: input validation (``checks``), seeds (``seeds``) and thread scoping and matmul precision
(``threads``), used by every other layer.

Dependencies point one way: utilities <- functional <- metrics <- callbacks <- cli.
"""

from lightning_geomarkers.utilities.checks import (
    all_finite,
    as_manifolds,
    as_tensor,
    check_bool,
    check_features,
    check_features_labels,
    check_finite,
    check_labels,
    check_lid,
    check_positive_int,
    check_protocol,
    check_rtol,
    check_seed,
)
from lightning_geomarkers.utilities.seeds import as_generator, child_generators, split_seeds
from lightning_geomarkers.utilities.threads import (
    SharedWork,
    TorchThreadPool,
    available_cpus,
    ieee_float32_matmul,
    limit_threads,
    torch_thread_pool,
)

__all__ = [
    "SharedWork",
    "TorchThreadPool",
    "all_finite",
    "as_generator",
    "as_manifolds",
    "as_tensor",
    "available_cpus",
    "check_bool",
    "check_features",
    "check_features_labels",
    "check_finite",
    "check_labels",
    "check_lid",
    "check_positive_int",
    "check_protocol",
    "check_rtol",
    "check_seed",
    "child_generators",
    "ieee_float32_matmul",
    "limit_threads",
    "split_seeds",
    "torch_thread_pool",
]

"""Data for modelscape sweeps: synthetic power-law Gaussians, Hermite monomial targets, HEA
eigenvalues, local image data sets with preprocessing, and ready batch functions.

Quick start::

    from modelscape.data import Monomial, monomial_bfn, powerlaw_eigenvalues
    from modelscape.data import relu_ntk_level_coefficients, hea_eigenvalue

    gamma = powerlaw_eigenvalues(d=32, alpha=1.5)
    coeffs = relu_ntk_level_coefficients(gamma, max_degree=4, depth=2)
    hea_eigenvalue("x0*x1", gamma, coeffs)
    bfn_config = {"base_bfn": monomial_bfn, "d": 32, "alpha": 1.5}  # target: an iterator axis
"""

from modelscape.data.bfns import ImageData, image_bfn, load_image_data, monomial_bfn, pool_bfn
from modelscape.data.hea import (
    hea_eigenvalue,
    hea_eigenvalues,
    relu_ntk_level_coefficients,
    top_hea_monomials,
)
from modelscape.data.hermite import Monomial, hermite
from modelscape.data.images import (
    CIFAR10_CLASSES,
    center,
    cifar10_folder,
    grayscale,
    load_cifar10,
    load_digits,
    normalize_samples,
    one_hot,
    select_classes,
    zca_whiten,
)
from modelscape.data.synthetic import (
    powerlaw_eigenvalues,
    powerlaw_gaussian,
    principal_coordinates,
)

__all__ = [
    "CIFAR10_CLASSES",
    "ImageData",
    "Monomial",
    "center",
    "cifar10_folder",
    "grayscale",
    "hea_eigenvalue",
    "hea_eigenvalues",
    "hermite",
    "image_bfn",
    "load_cifar10",
    "load_digits",
    "load_image_data",
    "monomial_bfn",
    "normalize_samples",
    "one_hot",
    "pool_bfn",
    "powerlaw_eigenvalues",
    "powerlaw_gaussian",
    "principal_coordinates",
    "relu_ntk_level_coefficients",
    "select_classes",
    "top_hea_monomials",
    "zca_whiten",
]

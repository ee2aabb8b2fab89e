"""The version and the distribution name: one source, read by pyproject.toml without imports."""

VERSION = "0.1.0"  # stored in run folders; the package root's __version__
# the name on the package index: `modelscape` there is an unrelated project
DISTRIBUTION = "modelscape-sweeps"

"""Real clusters for the integration tests (``clusters.py``): a single-node SLURM cluster and
a two-node Ray cluster, each started once per module that asks for it."""

from clusters import ray_cluster, slurm_cluster  # noqa: F401

"""The original modelscape's entry points: cli.parse_args/base_args and job_iterator.main."""

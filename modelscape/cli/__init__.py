"""The command line and its notebook twin: hyperparameters from flags (``args``: ``parse_args``,
``base_args``), the ``modelscape`` command (``main``), its demo sweep (``demo``) and the run
folder commands ``show``/``plot``/``export`` (``show``).
"""

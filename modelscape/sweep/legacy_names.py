"""The original modelscape's spellings: the one table every boundary uses to map them.

``DEPRECATED_NAMES`` maps each spelling of the original's code, README, tests and examples to
the current name; ``hparams`` accepts it with a FutureWarning naming the new spelling, at every
boundary: ``global_config`` keys, ``iterator_names``, command-line flags, ``--config`` files and
attribute reads/writes on the ``parse_args()``/``base_args()`` namespace. A value that is not a
schema field (``post_init_fn``) is a special config key. To accept another legacy spelling, add
one line here.
"""

DEPRECATED_NAMES = {
    "N_TRIAN": "N_TRAIN",
    "DETERMINSITIC": "DETERMINISTIC",
    "width": "WIDTH",
    "depth": "DEPTH",
    "DIM": "D_IN",
    "dim": "D_IN",
    "d_in": "D_IN",
    "d_out": "D_OUT",
    "model_class": "MODEL_CLASS",
    "optimizer": "OPTIMIZER",
    "OPTIMIZER_CLASS": "OPTIMIZER",
    "optimizer_class": "OPTIMIZER",
    "OPTIMIZER_FN": "OPTIMIZER",
    "optimizer_fn": "OPTIMIZER",
    "loss": "LOSS",
    "LOSS_CLASS": "LOSS",
    "loss_class": "LOSS",
    "LOSS_FN": "LOSS",
    "loss_fn": "LOSS",
    "momentum": "MOMENTUM",
    "weight_decay": "WEIGHT_DECAY",
    "EXPT_NAME": "SAVE_DIR",
    "POST_INIT_FN": "post_init_fn",
}

# Hyperparameters that the original's user code reads under its old spelling (its batch
# functions take ``d_out``): user code is offered the value under that name too.
USER_CODE_SPELLINGS = {"D_OUT": "d_out"}

# Axis names the original's job runner also read as the sample count or the trial; an axis of
# that name is refused with its current name (it would set nothing), unless the batch function
# takes it by name. ``bsz`` is the batch function's own argument, so it can never be an axis.
LEGACY_AXES = {"BSZ": "ntrain", "bsz": "ntrain", "TRIAL": "trial", "trials": "trial"}

# The original's model-from-file pair; together they are MODEL_CLASS="file.py:Name".
LEGACY_MODEL_FILE = {"MODEL_FILE": "MODEL_NAME", "model_file": "model_name"}

# Original keys that cannot be honoured, with the fix.
REFUSED_NAMES = {
    "OPTIMIZER_INSTANCE": "an optimizer built before the sweep cannot train the models each job "
    "builds; give OPTIMIZER (a class or torch.optim name) with MOMENTUM/WEIGHT_DECAY, or a "
    "post_init_fn(model, opt) that returns your own optimizer.",
    "LOSS_INSTANCE": "give LOSS, a torch.nn loss name or class (each job builds its own).",
}
REFUSED_NAMES["optimizer_instance"] = REFUSED_NAMES["OPTIMIZER_INSTANCE"]
REFUSED_NAMES["loss_instance"] = REFUSED_NAMES["LOSS_INSTANCE"]

"""MLP, CNN and ResNet on digits (10 classes): training curves side by side.

The built-in models are picked by name through the MODEL_CLASS axis; each trains with online
Adam on batches of the digits training split, with cross-entropy on integer labels (D_OUT=10 tells
the engine the number of outputs) and whole curves recorded (ONLYTHRESHOLDS=False). The plot
shows the EMA train loss against the step, one curve per model, with a band over trials.

    python examples/cnn_resnet.py                                 # CPU, < 1 minute
    python examples/cnn_resnet.py --WIDTH 128 --DEPTH 4 --MAX_ITER 3000 --PARAMETRIZATION mup

Needs the `data` extra (scikit-learn, for the digits): pip install -e ".[data]".
"""

from __future__ import annotations

from modelscape import MissingExtra, parse_args, run_sweep
from modelscape.data import image_bfn, load_image_data
from modelscape.results import plotting

DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "ONLINE": True,
    "ONLYTHRESHOLDS": False,
    "LOSS": "CrossEntropyLoss",
    "WIDTH": 32,
    "DEPTH": 2,
    "OPTIMIZER": "Adam",
    "LR": 0.01,
    "N_SAMPLES": 64,
    "MAX_ITER": 300,
    "EVAL_EVERY": 50,
    "LOSS_CHECKPOINTS": [0.05],
    "NUM_TRIALS": 2,
    "DEVICES": ["cpu"],
}

EXTRA = {
    "MODELS": (["MLP", "CNN", "ResNet"], "built-in model classes to compare"),
    "OUT": ("runs/cnn_resnet.png", "where to save the plot"),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    try:
        data = load_image_data("digits")
    except MissingExtra as err:
        raise SystemExit(f"cnn_resnet.py: {err}") from None
    args.X_te, args.y_te, args.D_OUT = data.X_test, data.y_test, data.num_outputs
    result = run_sweep(
        [args.MODELS, range(args.NUM_TRIALS)],
        ["MODEL_CLASS", "trial"],
        args,
        {"base_bfn": image_bfn, "dataset": "digits"},
    )
    print(result.summary())
    ax = plotting.loss_vs_step(result, y="train_loss", hue="MODEL_CLASS")
    ax.set_title(f"digits, 10 classes: width {args.WIDTH}, depth {args.DEPTH}")
    ax.set_ylabel("EMA train loss (cross-entropy)")
    print(f"plot saved to {plotting.save(ax, args.OUT)}")


if __name__ == "__main__":
    main()

"""Learning curves on real images: digits 0-vs-6 (built in), or CIFAR-10 when you have it.

A binary task with +-1 labels from two classes, MSE loss, trained offline on N_SAMPLES images
and tested on the data set's test split (passed as a fixed test set, X_te/y_te). Images are
centered with the training mean and scaled per sample to unit RMS pixel.

    python examples/images.py                                     # digits, CPU, < 1 minute
    python examples/images.py --DATASET cifar10 --DATASETPATH ~/data --CLASSES 0 6 \\
        --SIZES 64 256 1024 4096 --WIDTH 512 2048 --DEVICES 0

CIFAR-10 is read from the python-pickle batches (cifar-10-batches-py) under DATASETPATH (flag or
environment variable); nothing is downloaded. Needs the `data` extra (scikit-learn, for the
digits): pip install -e ".[data]".
"""

from __future__ import annotations

from modelscape import MissingExtra, parse_args, run_sweep
from modelscape.data import image_bfn, load_image_data
from modelscape.results import plotting

DEFAULTS = {  # this script's defaults: every flag overrides them, --help shows them
    "ONLINE": False,
    "WIDTH": [64, 256],
    "DEPTH": 2,
    "BIAS": True,
    "LR": 0.1,
    "MAX_ITER": 1000,
    "LOSS_CHECKPOINTS": [0.01],
    "NUM_TRIALS": 3,  # the fewest that give the median an interval
    "DEVICES": ["cpu"],
}

EXTRA = {
    "DATASET": ("digits", "digits (scikit-learn, built in) or cifar10 (local files)"),
    "DATASETPATH": ("", "folder holding cifar-10-batches-py (default: $DATASETPATH)"),
    "CLASSES": ([0, 6], "the two classes of the binary task (labels +1 and -1)"),
    "GRAYSCALE": (False, "convert RGB images to grayscale"),
    "SIZES": ([8, 16, 32, 64, 128, 256], "training-set sizes N_SAMPLES"),
    "OUT": ("runs/images.png", "where to save the plot"),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, extra=EXTRA, defaults=DEFAULTS)
    options = {
        "root": args.DATASETPATH or None,
        "classes": tuple(args.CLASSES),
        "to_grayscale": args.GRAYSCALE,
    }
    try:
        data = load_image_data(args.DATASET, **options)
    except (FileNotFoundError, MissingExtra) as err:
        raise SystemExit(f"images.py: {err}") from None
    print(
        f"{args.DATASET} classes {args.CLASSES}: {len(data.y_train)} training and "
        f"{len(data.y_test)} test images of shape {tuple(data.X_train.shape[1:])}"
    )
    args.X_te, args.y_te = data.X_test, data.y_test
    bfn_config = {"base_bfn": image_bfn, "dataset": args.DATASET, **options}
    # several --WIDTH values make WIDTH an axis of its own
    result = run_sweep([args.SIZES, range(args.NUM_TRIALS)], ["ntrain", "trial"], args, bfn_config)
    print(result.summary())
    hue = "WIDTH" if "WIDTH" in result.axes else None
    ax = plotting.learning_curve(result, x="N_SAMPLES", y="test_loss", hue=hue)
    ax.set_title(f"{args.DATASET} {args.CLASSES[0]} vs {args.CLASSES[1]}: MLP, MSE on +-1 labels")
    print(f"plot saved to {plotting.save(ax, args.OUT)}")


if __name__ == "__main__":
    main()

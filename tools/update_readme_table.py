"""Regenerate the hyperparameter reference (docs/reference/hyperparameters.md) from the schema
in modelscape/sweep/hparams.py. (The name is older than the docs site: the table used to live
in the README.)"""

from pathlib import Path

from modelscape.sweep.hparams import markdown_table

BEGIN, END = "<!-- hparams:begin -->", "<!-- hparams:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "hyperparameters.md"


def update_table(path: Path = PAGE) -> bool:
    """Rewrite the table between the page's hparams markers; True if it changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    print(
        "hyperparameter table updated" if update_table() else "hyperparameter table already current"
    )

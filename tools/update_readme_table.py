"""Regenerate the README's hyperparameter table from the schema in modelscape/hparams.py."""

from pathlib import Path

from modelscape.sweep.hparams import markdown_table

BEGIN, END = "<!-- hparams:begin -->", "<!-- hparams:end -->"


def update_readme(path: Path) -> bool:
    """Rewrite the table between the README's hparams markers; True if it changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    print("README table updated" if update_readme(readme) else "README table already current")

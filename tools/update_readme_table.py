"""Regenerate the README's hyperparameter table from the schema in modelscape/hparams.py."""

from pathlib import Path

from modelscape.hparams import update_readme

if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    print("README table updated" if update_readme(str(readme)) else "README table already current")

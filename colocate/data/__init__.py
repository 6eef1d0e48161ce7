"""The prompts a run trains and validates on: rows read from a local file (`read.py`), turned into prompt
text (`render.py`), split into training and held-out problems (`build.py`); or the arithmetic generator."""

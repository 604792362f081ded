"""What the transfer tests share besides fixtures (a uniquely named module: every test
directory has a conftest, so `from conftest import` depends on collection order)."""

# `transfer run` options that keep the tiny end-to-end runs to seconds
TINY_RUN = [
    "--steps",
    "3",
    "--rank",
    "4",
    "--batch-size",
    "4",
    "--max-new-tokens",
    "12",
    "--label-tokens",
    "8",
]

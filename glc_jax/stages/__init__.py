"""The stages train.py runs, one module each, selected by `config.stage`."""

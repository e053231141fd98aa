"""The lab: what every chapter runs on -- the training loop and its config, checkpoints, the zoo (train-or-load),
presets, the evaluation oracle, metrics, the scoreboard, plots, and loaders for real datasets."""

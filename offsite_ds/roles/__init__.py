"""Training roles: what is frozen, what the loss is, what gets exported. All share offsite_ds.train.train."""

"""Pictures: arrays to PNG (`pictures`: filter tiles, image grids, charts) and the pictures of a run (`report`)."""

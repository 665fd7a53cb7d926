"""Reading and writing: images, datasets, result files."""

"""Finding images, label CSVs, class-balanced subsets, decoding and datasets."""

"""One module per model family: stacked module lists, original-checkpoint key maps, config inference."""

"""One module per group of verbs: typed inputs in, results out; main() reports errors."""

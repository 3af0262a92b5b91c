"""The math of one factorization, as pure functions: weight and statistics in, factors out.
May import: llmrom.errors and llmrom.modeling.factorized (the self-contained module file); nothing else of ours."""

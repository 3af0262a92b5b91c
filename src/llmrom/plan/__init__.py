"""From a parameter budget to ranks: budgets, the automatic last-N choice with its trials, rank policies,
the token embedding's share of the cut. May import: factor, modeling, data, eval, loop (trials run the loop)."""

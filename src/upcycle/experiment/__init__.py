"""`upcycle experiment`: arms x seeds x budgets, run and resumed; the statistics and the report."""

"""`vlpt compare` and `vlpt report`: several recipes at one budget, one suite, one report.

runs (plan, train, resume) -> table (read runs back, aggregate seeds, Markdown tables; stats: the win/tie
rule; chance) -> plots, scaling (fits, bootstrap) -> report (report.md, summary.json) -> html (one page).
"""

"""`clbench report`: figures, tables and report.md from run directories (read through clbench.results).

    build      the report: figures, tables, report.md
    tables     the report's tables
    plotstyle  one figure style for every figure
"""

"""Analysis of SpecFed testbed runs: load the run folders' tables into pandas, plot with
seaborn, write a markdown report (Pantheon's analyze -> plot -> report in one command).

    analysis report results/<scenario>/<run>/ [more runs] [--out DIR]
    analysis compare RUN_A RUN_B [--out DIR]
    analysis paper RUN_DIR      (figures + report of a `python -m specfed.study` run)

Modules: load (run folders -> DataFrames), styles (the configuration registry: name, colour,
marker), tables (every number), plots (the figures), report (report.md / compare.md), cli;
paper, paper_figures, paper_report: Fig. 2 / Fig. 3 and report.md of a study run folder.
Separate from specfed and testbed: it reads only the files a run leaves behind.
"""

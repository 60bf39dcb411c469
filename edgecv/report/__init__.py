"""Reports: render `BenchRow`s (and a compress run's sections) as report.json, report.md, pareto.png and
rich tables. Rendering only: measuring is `edgecv.bench`'s."""

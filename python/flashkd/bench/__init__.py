"""Microbenchmark harness: ``python -m flashkd.bench`` (or ``flashkd-bench``).

Each op (``ops/``) is measured against torch eager (``flashkd.reference``),
``torch.compile`` of it, and peers when importable, for median time forward and
forward+backward, peak extra memory, error against the float64 oracle, and the
ratio to the physical floor measured in the same run.

Modules, one job each:
  cases     what a case, its inputs and a provider are
  selection which cases --ops and --shapes name
  ops/      one module per benchmarked op (inputs, providers, floor, oracle)
  machine   device description and copy bandwidth (the floor's denominator)
  timing    median of timed calls (CUDA events on GPU, wall clock on CPU)
  memory    peak extra memory of a block of code
  measure   one (case, provider) measurement
  worker    child-process entry: CPU measurements each run in a fresh process
  runner    walks cases and providers, adds errors and ratios to the records
  progress  progress on stderr
  report    table, JSON and plot
"""

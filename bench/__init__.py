"""qvm benchmarks: `python -m bench` (or `make bench`) prints measured figures and their ratio to targets.

Nothing here asserts a timing; every figure is printed with the method that produced it, and a summary
table says which targets were met on this machine. Each benchmark starts its own embedded NATS under a
temporary directory and removes it (and every process it started) before exiting.

Modules:
    common     figures, percentiles, windowed concurrency, log counting
    stack      an embedded NATS with provisioned streams for one benchmark
    codec      1. per-event cost: sign, verify, sign+publish+verify through JetStream
    placement  2. scheduler placement on 1,000 nodes: burst and paced submissions, double-booking check
    audit      3. audit replay rate, process pool and inline
    report     the summary table
"""

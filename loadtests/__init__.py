"""Load tests of rmserve over its real HTTP API, on loopback only.

`python -m loadtests run` drives one scenario against a running server; `python -m loadtests
suite` starts `rmserve serve` itself, runs every scenario and writes a markdown report with PNG
plots. Modules: `loopback` (the local-only guard), `workload` (the trajectories sent),
`generator` (open- and closed-loop drivers and what each request recorded), `scenarios` (what
each scenario sends and when), `stats` (summaries), `report` (markdown and plots), `machine`
(what ran the test), `server` (the `rmserve serve` the suite starts; models and queue depth of
any server), `suite` (server + scenarios + report). `score_load` is the closed-loop throughput
harness of the benchmarks.
"""

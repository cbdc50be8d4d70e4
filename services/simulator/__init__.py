"""`fanout feeds`: simulated upstream feeds, the stand-in for the real publishers in the
demo, the tests and the benchmarks."""

"""What only the launchers, examples, tests and benchmarks need, not the optimizer: the shipped
byte-level corpus and its world-size-invariant sampler (:mod:`.data`), model presets built from
configs (:mod:`.models`). Nothing in the core imports this package."""

"""The benchmarks behind ``lmjobs bench``: the engine against naive ``generate`` loops, and the
queue end to end. Never imported by production code."""

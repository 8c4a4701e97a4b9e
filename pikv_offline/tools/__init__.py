"""Tools above both stages: they may import teacher/ and student/; nothing below imports them.

fidelity (verify --recompute), make_student, sweep, demo and its corpus, plot, toy (tiny models and
tokenizers built locally for the demo, tests and benches).
"""

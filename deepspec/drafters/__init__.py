"""Drafting methods: one package per trained drafter kind (see `registry`), the untrained proposers
(prompt lookup, suffix decoding, an independent draft LM), the hybrid, and `build.build_proposer`."""

"""The FLOP-matched study (issue 15): BPE vs byte vs BLT transformers on the same bytes and training FLOPs.

`corpus` prepares the text offline and records where every byte came from, `bpe` trains the byte-level BPE
tokenizer and the token transformer's loop, `lm_score` scores causal LMs (byte or BPE) on held-out documents,
`variants` builds each run's config, `runner` plans the matched budget and trains, `report` writes the tables
and the plot. `scripts/flop_matched_study.py` is the command line.
"""

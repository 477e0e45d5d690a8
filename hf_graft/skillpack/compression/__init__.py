"""How a SkillPack stores a weight delta, and how each stored form is chosen and fitted.

- :mod:`.bitpack`: codes of 1-8 bits packed into a little-endian bitstream.
- :mod:`.quantize`: group quantization of matrices and of mixed-precision low-rank factors.
- :mod:`.lowrank`: truncated (randomized) SVD of a delta.
- :mod:`.prune`: the largest entries of a delta, stored sparse.
- :mod:`.formats`: the stored formats (specs), their byte layout on disk and their checks.
- :mod:`.objective`: what a delta's error costs the model (input and output statistics).
- :mod:`.calibrate`: compression against those statistics (GPTQ, activation-aware SVD).
- :mod:`.allocation`: the candidate formats of each delta and the choice under a byte budget.
- :mod:`.rowwise`: the same work on deltas too large to hold whole, a row block at a time.
- :mod:`.distillation`: the stored scales tuned so the model's outputs match the tuned model's.
"""

"""Making a SkillPack: one pipeline, fed deltas and statistics from loaded models or checkpoint files.

- :mod:`.pipeline`: the steps every pack goes through (measure, choose, compress, finish), with a
  source of deltas and a source of statistics plugged in.
- :mod:`.loaded`: :func:`extract_skillpack` and the sources of loaded models (or LoRA adapters);
  folders and Hub ids go on to :mod:`.checkpoints`.
- :mod:`.checkpoints`: the deltas of two checkpoints read tensor by tensor, never a whole model.
- :mod:`.sequential`: statistics measured with the model run one decoder block at a time.
- :mod:`.journal`: the record of a partly made pack, to resume and to share work between processes.
- :mod:`.packing`: what happens to one delta (measure, compress) and to the pack (choose, assemble).
- :mod:`.calibration_data`: calibration texts and the token batches cut from them.
"""

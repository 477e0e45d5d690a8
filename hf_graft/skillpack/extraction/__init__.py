"""Making a SkillPack: from loaded models, or straight from checkpoint files.

- :mod:`.loaded`: :func:`extract_skillpack` on loaded models (or LoRA adapters); folders and Hub ids
  go on to :mod:`.checkpoints`.
- :mod:`.checkpoints`: extraction that reads both checkpoints tensor by tensor, journalled and
  resumable, split across processes under ``accelerate launch``.
- :mod:`.sequential`: calibrated extraction from checkpoint files, one decoder block at a time.
- :mod:`.packing`: the steps every delta goes through on both paths (measure, choose, compress,
  assemble the pack).
- :mod:`.calibration_data`: calibration texts and the token batches cut from them.
"""

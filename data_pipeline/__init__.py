"""Training data: StoryStream jsonl + images → tfds ArrayRecord → grain → SEED-Story batches.

    storystream.py  jsonl reading, chunking to 10, image checks, path safety, drop accounting
    builder.py      tfds GeneratorBasedBuilder writing ArrayRecord (no TensorFlow); StorySource reader
    samples.py      the SEED-Story sample (spec §5.2): token stream, labels, the four masks
    pipeline.py     grain: shuffle → sample → static-shape batches → per-process shard → workers,
                    checkpointable iterator (get_state/set_state, orbax)
    synth.py        synthetic stories with per-frame ground truth and `score_frame`

CLI: `seed-story data build ...`, `seed-story data synth ...` (seed_story_jax/commands/data.py).
"""

"""The two stages: teacher (stage one, writes the cache) and student (stage two, reads it)."""

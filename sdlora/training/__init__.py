"""Training: the loop and what it writes (checkpoints, resume, memory estimate, events, the job queue)."""

"""Training: the loop and what it writes (checkpoints, resume, memory estimate, events, the job queue).

Entry point: sdlora.training.trainer.train. Not re-exported here, so that importing the light parts (events, the job
queue) does not load torch.
"""

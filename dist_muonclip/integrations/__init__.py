"""Integrations with the stacks users already run: DeepSpeed (JSON config), FSDP2 / DTensor
meshes, the seed repositories' APIs (compat), launchers (mpirun / SLURM rank discovery) and the
transformers attention glue. They depend on the core (``dist_muonclip.*``); the core imports none
of them."""

"""Engine scenarios shared by the tests and the benchmarks: tiny HF models built from configs
(:mod:`.tiny_hf`), and per-rank workers that train them with MuonClip under DDP / optimizer-owned
reduction (:mod:`.ddp`), DeepSpeed (:mod:`.deepspeed`) and FSDP2 (:mod:`.fsdp`) next to their
single-process oracles. ``benchmarks/multi_gpu.py`` runs them under NCCL; ``tests/`` on gloo.
The benchmarks never import ``tests/``."""

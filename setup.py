"""dist_muonclip: distributed MuonClip (Muon + AdamW + per-head QK-Clip) for PyTorch."""
from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).resolve().parent / "README.md"

EXTRAS = {
    # Hugging Face models: automatic attention discovery and max-logit tracking.
    "transformers": ["transformers>=4.48"],
    # DeepSpeed JSON-config integration (ZeRO-0/1/2).
    "deepspeed": ["deepspeed>=0.19"],
    # HF Trainer / accelerate / Lightning integrations (dist_muonclip.hf, examples/).
    "hf": ["transformers>=4.48", "accelerate>=1.0", "deepspeed>=0.19", "lightning>=2.4"],
    # Triton Newton-Schulz and max-logit kernels (GPU; CPU via TRITON_INTERPRET=1).
    "triton": ["triton>=3.1"],
    # rank discovery under mpirun / SLURM.
    "mpi": ["mpi4py>=4.0", "mpich>=4.2"],
    # metrics sinks.
    "wandb": ["wandb>=0.17"],
    "tensorboard": ["tensorboard>=2.15"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=7.4", "hypothesis>=6.100", "pytest-timeout>=2.2", "matplotlib>=3.7",
                                  "nbclient>=0.9", "nbformat>=5", "ipykernel>=6",
                                  "expecttest>=0.2"]  # torch.testing._internal (torch's OptimizerInfo inputs)

setup(
    name="dist_muonclip",
    version="0.1.0",
    description="Distributed MuonClip optimizer (Muon + AdamW + QK-Clip) for PyTorch: DDP, FSDP2, DeepSpeed",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["dist_muonclip", "dist_muonclip.*"]),
    # the packages live at the repository root: an editable install is one .pth entry (no import
    # finder, and no setuptools notice about it on every set-up)
    package_dir={"": "."},
    package_data={"dist_muonclip.support": ["corpus.txt.gz", "CORPUS.md"]},
    include_package_data=True,
    python_requires=">=3.10",
    # torch is the only hard requirement: a CPU-only user can install and run everything
    # except the GPU kernels. Everything heavy is an extra.
    install_requires=["torch>=2.5", "numpy", "tqdm"],
    extras_require=EXTRAS,
)

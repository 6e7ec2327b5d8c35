"""lemur-rec: distributed end-to-end multimodal recommendation (LEMUR / EM3)."""

from setuptools import find_packages, setup

# torch, fbgemm-gpu and torchrec must be a matched triple (fbgemm-gpu 1.X is built against torch 2.(X+5)),
# and `pip install torchrec` pulls the CUDA fbgemm-gpu. The README's version matrix says what to pair;
# `make install` does it for CPU. The extras pick the fbgemm flavour.
COMMON = [
    "deepspeed>=0.16",
    "transformers>=4.45",
    "tokenizers>=0.20",
    "webdataset>=0.2.90",
    "pyarrow>=15",
    "pillow>=10",
    "numpy>=1.26",
    "tqdm",
    "tensorboard",
    "tensordict",
    "torchmetrics==1.0.3",
    "pyre-extensions",
    "iopath",
]

setup(
    name="lemur-rec",
    version="0.1.0",
    description="Distributed end-to-end multimodal recommendation: TorchRec ID tables + DeepSpeed encoders",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "embeddings", "embeddings.*"]),
    package_data={"trainer.config": ["presets/*.toml"]},
    install_requires=["torch>=2.11"] + COMMON,
    extras_require={
        "cpu": ["fbgemm-gpu-cpu", "torchrec"],
        "gpu": ["fbgemm-gpu", "torchrec"],
        "dev": ["pytest", "ruff", "scikit-learn"],
    },
    entry_points={"console_scripts": ["lemur=trainer.cli:main"]},
)

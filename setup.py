"""BiomedGPT at every scale: the OFA/BiomedGPT model, MDS streaming data, DeepSpeed training, SLURM launch.

Compatible ranges here; requirements.txt pins the exact versions the README and CI install.
"""
from setuptools import find_packages, setup

setup(
    name="biomedgpt-scale",
    version="0.1.0",
    description="Train BiomedGPT-style generalist biomedical vision-language models from 33M to 930M parameters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "data", "data.*", "engine", "engine.*",
                                    "tools", "tools.*"]),
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "deepspeed>=0.16,<0.20",
        "mosaicml-streaming>=0.13,<0.14",
        "numpy>=1.24,<2.2",
        "transformers>=4.40,<5",
        "tokenizers>=0.19,<0.23",
        "safetensors>=0.4",
        "pyarrow>=15",
        "pillow>=10",
        "wandb>=0.17",
        "pydicom>=2.4",
        "PyYAML>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        "boto3>=1.28",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "pycocoevalcap>=1.2",
        "rouge_score>=0.1.2",
        "nltk>=3.8",
        "sacrebleu>=2.3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "moto[server]>=5", "pydicom-data>=1.0",
                 "scikit-image>=0.22"],
        "flash": ["flash-attn>=2.5"],
    },
)

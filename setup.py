"""BiomedGPT at every scale: the OFA/BiomedGPT model, MDS streaming data, DeepSpeed training, SLURM launch.

Compatible ranges here; requirements.txt pins the exact versions the README and CI install.
"""
from setuptools import find_packages, setup

# The repository keeps its top-level folders; installed, they are subpackages of one namespace,
# ``biomedgpt`` (no top-level ``models``/``data``/... that could clash with an OFA checkout's own).
SUBPACKAGES = ("core", "models", "data", "engine", "tools", "launchers")
DATA_FOLDERS = ("configs", "ds_configs")  # package data only (YAML recipes, DeepSpeed templates)
packages, package_dir = [], {}
for sub in SUBPACKAGES:
    for found in [sub, *(f"{sub}.{p}" for p in find_packages(sub))]:
        packages.append(f"biomedgpt.{found}")
        package_dir[f"biomedgpt.{found}"] = found.replace(".", "/")
for folder in DATA_FOLDERS:
    packages.append(f"biomedgpt.{folder}")
    package_dir[f"biomedgpt.{folder}"] = folder

setup(
    name="biomedgpt",
    version="0.1.0",
    description="Train BiomedGPT-style generalist biomedical vision-language models from 33M to 930M parameters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={
        "biomedgpt.configs": ["*.yaml", "*/*.yaml"],
        "biomedgpt.ds_configs": ["*.json"],
        "biomedgpt.models": ["vocab/gpt2/*"],
        "biomedgpt.launchers": ["*.sh", "*.sbatch"],
        "biomedgpt.tools": ["hf_templates/*.py"],  # written into format=transformers exports, never imported
    },
    entry_points={"console_scripts": ["biomedgpt = biomedgpt.tools.cli:main"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "deepspeed>=0.16,<0.20",
        "mosaicml-streaming>=0.13,<0.14",
        "numpy>=1.24,<2.2",
        "transformers>=4.40,<5",
        "tokenizers>=0.19,<0.23",
        "safetensors>=0.4",
        "huggingface_hub>=0.24,<1.1",
        "xxhash>=3",
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
        "peft>=0.17,<0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "moto[server]>=5", "pydicom-data>=1.0",
                 "scikit-image>=0.22"],
        "flash": ["flash-attn>=2.5"],
    },
)

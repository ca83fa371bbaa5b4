"""SLURM and local launch helpers (the sbatch scripts call ``python -m biomedgpt.launchers.slurm_env``)."""

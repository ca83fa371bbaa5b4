"""SLURM and local launch helpers (the sbatch scripts call ``python -m launchers.slurm_env``)."""

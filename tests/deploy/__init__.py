"""Tests of deploy/: render.py, validate.py and the Slurm script (run by scripts/validate_deploy.sh)."""

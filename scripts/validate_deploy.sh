#!/usr/bin/env bash
# Offline checks of deploy/ (`make validate-deploy`; `make test` runs it after cargo test):
# - the Slurm script, this one and the test stand-ins: `bash -n` and shellcheck;
# - tests/deploy: unit tests of deploy/render.py and deploy/validate.py, and a run of the sbatch
#   script against stand-ins for srun/scontrol/medtvt;
# - deploy/validate.py: every overlay rendered without kustomize (deploy/render.py), validated
#   against the Kubernetes 1.31+ schemas (strict), cross-checked against its run config; the
#   Dockerfile parsed and its paths checked. No cluster, registry or network needed after the
#   pip install.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh scripts/requirements-deploy.txt
PY=.venv/bin/python

shell_scripts=(deploy/slurm/medtvt-grpo.sbatch scripts/validate_deploy.sh tests/deploy/fake-slurm/srun tests/deploy/fake-slurm/scontrol tests/deploy/fake-slurm/medtvt)
for script in "${shell_scripts[@]}"; do
  bash -n "$script"
done
.venv/bin/shellcheck -x "${shell_scripts[@]}"
echo "ok   bash -n and shellcheck: ${shell_scripts[*]}"

"$PY" -m unittest discover --start-directory tests/deploy --top-level-directory . --quiet
"$PY" deploy/validate.py

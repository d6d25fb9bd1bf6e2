# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv/ (torch 2.11.0,
# whose libtorch the Rust crates link) on first use.
.PHONY: setup build demo showcase test chaos validate-deploy fixtures bench bench-grpo gpu-check fuzz clean-venv

CARGO ?= cargo
VENV := .venv

setup:
	@scripts/setup_venv.sh

build: setup
	$(CARGO) build --release --bin medtvt

# The whole PT -> SFT -> GRPO pipeline of the tiny model as separate processes over loopback gRPC.
demo: build
	./target/release/medtvt demo

# The same pipeline sized for GRPO to have evidence to sharpen (1200 encounters, 600 SFT steps,
# 30 GRPO steps; meant to stay under an hour on 2 idle cores), under runs/showcase/. SEED=1 etc.
# for other seeds. docs/results.md has what it measured.
SEED ?= 0
showcase: build
	./target/release/medtvt demo --showcase --seed $(SEED)

# The peers the tests compare against (transformers, wfdb, scikit-learn, kubernetes-validate) go
# into .venv first, so parity tests run instead of skipping; MEDTVT_REQUIRE_PEERS=1 makes a test
# whose peer is still missing fail instead of skipping (model/tests/peers/mod.rs). Formatting
# (rustfmt.toml) and clippy's lints are checked first, as habits of every change.
test: setup
	@scripts/setup_venv.sh scripts/requirements-fixtures.txt scripts/requirements-deploy.txt
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	MEDTVT_REQUIRE_PEERS=1 $(CARGO) test --workspace --no-fail-fast
	scripts/validate_deploy.sh

# Fault injection with real processes (kill -9 a worker, a learner, the coordinator; a wrong
# token; a corrupt checkpoint; a dataset with broken files; a learner rank of two killed or stopped
# under on_learner_loss = shrink / wait), printed as a Markdown table.
# The same tests also run in `make test`; docs/reliability.md keeps a copy of the table.
chaos: setup
	@scripts/chaos.sh

# Offline checks of deploy/ (Kubernetes manifests, Slurm script, Dockerfile); see the script.
validate-deploy: setup
	scripts/validate_deploy.sh

# Regenerates the committed test fixtures (transformers, scikit-learn, nltk and TRL in .venv: the
# peers our parity tests compare with).
fixtures:
	@scripts/setup_venv.sh scripts/requirements-fixtures.txt scripts/requirements-bench.txt
	$(VENV)/bin/python scripts/make_llama_fixtures.py
	$(VENV)/bin/python scripts/make_metric_fixtures.py
	$(VENV)/bin/python scripts/make_grpo_loss_fixtures.py
	$(VENV)/bin/python scripts/make_chatml_base_fixture.py

bench: setup
	@scripts/setup_venv.sh scripts/requirements-fixtures.txt
	$(CARGO) run --release -p medtvt-model --example bench_generate

# One GRPO step of ours (rollout + learner, one process) side by side with TRL's GRPOTrainer on the
# same weights and shapes; see docs/benchmarks.md.
bench-grpo: setup
	@scripts/setup_venv.sh scripts/requirements-fixtures.txt scripts/requirements-bench.txt
	$(CARGO) run --release -p medtvt-cli --example bench_grpo

# The GPU check: release binaries (stripped, with scripts/gpu_check.sh) in target/gpu-check, to copy
# to a GPU machine with torch 2.11 and no Rust, and run there: target/gpu-check/gpu_check.sh run.
gpu-check: setup
	scripts/gpu_check.sh bundle target/gpu-check

# Bounded fuzzing of the WFDB, answer and config parsers (nightly toolchain; FUZZ_SECONDS per
# target, default 60). Not part of `make test`.
fuzz:
	scripts/fuzz.sh

clean-venv:
	rm -rf $(VENV)

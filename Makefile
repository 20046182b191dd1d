# The two set-up commands of the README. Each creates .venv and installs what it needs.
.PHONY: demo test

# Main job end to end on the embedded default (local Ray, local storage, offline backbone, demo subset)
demo:
	scripts/setup_env.sh
	RAY_AUTH_MODE=disabled .venv/bin/python -m jobs.index --config configs/demo.yaml

# Whole test suite
test:
	scripts/setup_env.sh test
	RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q tests

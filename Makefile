# The two set-up commands of the README. Each creates .venv and installs what it needs.
.PHONY: demo test

# Main job end to end on the embedded default (local Ray, local storage, offline backbone, demo subset)
demo:
	scripts/setup_env.sh
	RAY_AUTH_MODE=disabled .venv/bin/python -m jobs.index --config configs/demo.yaml

# Whole test suite: two workers by file where there are two cores (the end-to-end tests wait on Ray and
# subprocess start-up a third of the time), one process otherwise
test:
	scripts/setup_env.sh test
	RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q tests -n $$([ "$$(nproc)" -ge 2 ] && echo 2 || echo 0) \
		--dist loadfile

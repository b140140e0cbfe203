# Two commands matter:
#   make run    install what is missing, build, fetch the default model, chat
#   make test   run the whole test suite on the real model
# Build output lives outside the clone so rebuilds (and CI) reuse it.
CARGO_TARGET_DIR ?= $(HOME)/.cache/imprint/target
export CARGO_TARGET_DIR
BIN := $(CARGO_TARGET_DIR)/release/imprint

.PHONY: run test setup build model lint fmt results results-quick

run: setup build model
	$(BIN) chat

test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

build:
	cargo build --release

model: build
	$(BIN) model pull

# Re-measure the evaluation tables and charts of docs/RESULTS.md (long: about
# an hour on 2 cores; results-quick runs one UPQA item per attribute type).
results: build model
	IMPRINT_BIN=$(BIN) bash scripts/results.sh

results-quick: build model
	IMPRINT_BIN=$(BIN) bash scripts/results.sh --items 10 --prefeval-items 10

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt

# Every task is a target; CI (.ci/run) calls `make test`. VENV can point at an existing virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: eval train-classifier tokenizer-model setup crds chart-files test-chart test-crds test-operator test test-unit test-extproc test-dataplane test-faults faults-scorecard test-fuzz fuzz bench bench-peers bench-scale bench-attempt bench-translation bench-first-token bench-relay bench-consumers bench-rollouts protos protos-check lint up validate clean

# Strict editable mode: extproc/ and operator/ install as signalbox.extproc and
# signalbox.operator through a link tree under build/ (operator/ has no __init__.py, so it can
# never shadow the stdlib module `operator`). The folders are prerequisites because adding or
# removing a module changes their mtime and needs a re-install.
PACKAGE_DIRS := src/signalbox src/signalbox/core src/signalbox/core/envoygen src/signalbox/api/v1alpha1 src/signalbox/api/envoyext extproc extproc/translate operator
LINK_TREE = $(firstword $(wildcard build/__editable__.signalbox-*))

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt $(PACKAGE_DIRS)
	test -x $(PY) || python3 -m venv $(VENV)
	cd / && $(abspath $(PY)) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -c constraints.txt --config-settings editable_mode=strict
	touch $@

## Re-pin constraints.txt from the current environment (after changing dependencies).
lock: setup
	( echo "# Exact versions installed by \`make setup\` and by containers/Dockerfile (regenerate: \`make lock\`)."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^signalbox' ) > constraints.txt

## Regenerate src/signalbox/api from proto/ with the pinned grpcio-tools (reproducible).
protos: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src \
		proto/signalbox/api/v1alpha1/config.proto proto/signalbox/api/envoyext/priority_group.proto

## Fails when the committed generated code differs from what `make protos` writes.
protos-check: protos
	git diff --exit-code -- src/signalbox/api || (echo "generated protos are stale: run make protos and commit" && exit 1)

## Regenerate crds/ from the resource models (tests fail while the committed files are stale).
crds: setup
	$(PY) -c "from pathlib import Path; from signalbox.core import crdgen; \
	[Path('crds', n).write_text(crdgen.render(o)) for n, o in crdgen.definitions().items()]"

## The chart's Envoy bootstrap: the same generator as `signalbox up`, with the pod's layout.
chart-files: setup
	$(PY) -c "from signalbox import pod; pod.write_bootstrap_files()"

## Render, lint and validate the Helm chart over a matrix of values.
test-chart: setup
	$(PYTEST) tests/chart

test-crds: setup
	$(PYTEST) tests/crds

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPYPATH=$(LINK_TREE) $(BIN)/mypy -p signalbox
	cd $(LINK_TREE) && $(abspath $(BIN))/lint-imports --config $(abspath pyproject.toml)

test-unit: setup
	$(PYTEST) tests/unit

test-extproc: setup
	$(PYTEST) tests/extproc

## kopf against kmock's Kubernetes API emulator.
test-operator: setup
	$(PYTEST) tests/operator

test-dataplane: setup
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST) tests/dataplane

## Providers that misbehave (errors, resets, silence, broken streams, refusals, flapping)
## through the real Envoy, driven by the OpenAI SDK.
test-faults: setup
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST) tests/faults

## The fault tier, then its measured results as the README's failover scorecard.
faults-scorecard: setup
	SIGNALBOX_FAULTS_SCORECARD=build/faults-scorecard.json PATH=$(abspath $(BIN)):$$PATH $(PYTEST) tests/faults
	$(PY) -m tests.faults.scorecard build/faults-scorecard.json README.md

## Hostile request bodies through the router phase (a bounded slice; `make fuzz` runs the full count).
test-fuzz: setup
	$(PYTEST) tests/fuzz

## The full fuzz run: 100,000 bodies through the phase functions and the servicer, 10,000
## through a real Envoy (about 15 minutes on 2 cores).
fuzz: setup
	SIGNALBOX_FUZZ_EXAMPLES=50000 $(PYTEST) tests/fuzz
	SIGNALBOX_FUZZ_ENVOY=10000 PATH=$(abspath $(BIN)):$$PATH $(PYTEST) tests/dataplane/test_hardening.py -k "hostile or fuzzed"

## The README's test command: every tier plus lint and generated-code freshness.
test: protos-check lint test-unit test-crds test-chart test-extproc test-fuzz test-operator test-dataplane test-faults

## Plain Envoy vs Signalbox, same fake upstream, same load, one run -> bench/results/latest.json
bench: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.dataplane
	$(PY) -m bench.tiers
	$(MAKE) bench-translation
	$(MAKE) bench-first-token
	$(MAKE) bench-relay
	$(MAKE) bench-consumers
	$(MAKE) bench-rollouts
	$(MAKE) bench-scale

## Scale (needs h2load, Debian nghttp2-client): a 2,000-provider/2,000-policy fleet through
## compile, publish and `signalbox up`; 5,000 open 30 s streams per strategy
## -> bench/results/scale.json; what one Envoy cluster costs -> bench/results/cluster_cost.json
## (and whether a route of priority groups walks a chain as an aggregate does: bench.chain_groups);
## TLS backends through one origin per endpoint against a TLS cluster each -> bench/results/tls_origin.json
bench-scale: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.scale config --providers 200
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.scale config --providers 2000
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.scale streams --streams 5000 --seconds 30
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.cluster_cost --clusters 2000
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.chain_groups
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.tls_origin

## What attempt.lua's response hook costs the compiled path (whole / without stream sanitizing /
## without the hook, each against plain Envoy in the same round); needs wrk.
bench-attempt: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.attempt_ab --rounds 3 --seconds 3

## What translating between API families costs: same-API vs translated pairs, JSON and
## streams of 100 chunks, against plain Envoy -> bench/results/translation.json
bench-translation: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.translation --rounds 3 --seconds 3

## The first-token deadline (issue 13): a policy with it against one without, JSON and streams
## of 100 chunks, against plain Envoy -> bench/results/first_token.json
bench-first-token: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.first_token --rounds 3 --seconds 3

## What the stream relay costs (failover.onBrokenStream error/continue), decided aliases vs plain Envoy.
bench-relay: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.relay --rounds 3 --seconds 3

## Consumers (issue 15): a key and a token limit checked per request, embedded and in Redis,
## against the same policies without consumers -> bench/results/consumers.json
bench-consumers: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.consumers --rounds 3 --seconds 3

## Rollouts (issue 17): a shadowed and a canaried policy against the same decided policy
## -> bench/results/rollouts.json
bench-rollouts: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.rollouts --rounds 5 --seconds 3

## Signalbox vs LiteLLM's proxy and Portkey's gateway, same fake, load and machine (needs wrk,
## npm; installs the pinned peers under build/peers/) -> bench/results/peers.json
bench-peers: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m bench.peers

## Retrain the task-type classifier shipped as extproc/task_types.npz (reports its folds first).
train-classifier: setup
	OPENBLAS_NUM_THREADS=1 $(PY) -m eval.train_classifier

## wordllama's tokenizer as the SentencePiece model the ext_proc loads (after a wordllama upgrade).
tokenizer-model: setup
	$(PY) -m signalbox.extproc.wordtokens

## Classifier and routing quality on ../shared/data -> eval/results/latest.json (+ PNG curve).
## FASTCHAT=<lm-sys/FastChat checkout> adds task types on MT-bench and Vicuna-bench,
## WIZARDLM=<nlpxucan/WizardLM checkout> on its Evol-Instruct test set.
eval: setup
	$(PY) -m eval.run $(if $(FASTCHAT),--fastchat $(FASTCHAT)) $(if $(WIZARDLM),--wizardlm $(WIZARDLM))

## Run the local gateway on the embedded quickstart (offline, example providers included).
up: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/signalbox up -f examples/quickstart/

## Each example on its own: both folders define the alias `auto` (two ways to serve it).
validate: setup
	$(BIN)/signalbox validate -f examples/quickstart/
	$(BIN)/signalbox validate -f examples/providers/

clean:
	rm -rf $(VENV) build *.egg-info

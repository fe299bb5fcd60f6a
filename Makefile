# Two commands for a new user: `make demo` (build the data, train the small MG2 end to end, evaluate it, generate samples) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed

.PHONY: install demo ablations distill test bench space clean

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU wheel available locally; the rest then resolves without replacing it.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# Their metadata asks for PyAudio (live playback) and TensorFlow (we run basic-pitch's ONNX model).
	$(PIP) install --no-deps tinysoundfont basic-pitch
	touch $(INSTALLED)

install: $(INSTALLED)

# `make demo`: every stage writes its output once and is skipped when it exists (order-only
# prerequisites, so timestamps never trigger retraining); an interrupted training stage resumes from
# its last checkpoint. A second `make demo` goes straight to generating the samples.
DATASET := data/mg2-folk
SMALL := training/configs/small.yaml
# accelerate trains on the GPU when there is one, else on the CPU; MG2's UNet then trains in bf16 autocast and its
# latent cache is built in one process (forked workers are for CPU cores). Without `--num_cpu_threads_per_process`
# (or `--cpu`), accelerate sets OMP_NUM_THREADS=1 and a CPU run computes on one core.
CUDA = $(shell $(PY) -c "import torch; print('yes' if torch.cuda.is_available() else '')")
LAUNCH = $(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(CORES)
DATA_DONE := $(DATASET)/summary.json
CLMP_DONE := checkpoints/clmp-small/model.safetensors
INDEX_DONE := checkpoints/melody-index/config.json
VAE_DONE := checkpoints/vae-small/config.json
MG2_DONE := checkpoints/mg2-small/model_index.json
POOLED_DONE := checkpoints/mg2-small-pooled/model_index.json
TEXT_DONE := checkpoints/mg2-small-text/model_index.json
PLAIN_SKETCH_DONE := checkpoints/mg2-small-plain-sketch/eval/eval_results.json
NO_TEXT_ATTENTION_DONE := checkpoints/mg2-small-no-text-attention/eval/eval_results.json
EVAL_DONE := checkpoints/mg2-small/eval/eval_results.json
ABLATIONS_DONE := checkpoints/mg2-small/eval-ablations/eval_results.json
# The latent cache is built by one forked process per core, one compute thread each (`nproc` would count
# OMP_NUM_THREADS instead of cores).
CORES = $(shell $(PY) -c "import os; print(len(os.sched_getaffinity(0)))")
MG2_ARGS = --config $(SMALL) --dataset $(DATASET) --clmp checkpoints/clmp-small --retriever checkpoints/melody-index \
	--vae checkpoints/vae-small --resume_from_checkpoint latest $(if $(CUDA),--latent_cache_workers 1 --mixed_precision bf16,--latent_cache_workers $(CORES))

demo: install | $(EVAL_DONE)
	$(PY) training/generate_samples.py --model checkpoints/mg2-small --output_dir samples
	@echo "Evaluation: checkpoints/mg2-small/eval/eval_results.md"

$(DATA_DONE): | $(INSTALLED)
	$(PY) training/prepare_data.py --output_dir $(DATASET)

$(CLMP_DONE): | $(DATA_DONE)
	$(LAUNCH) training/train_clmp.py --config $(SMALL) --dataset $(DATASET) --output_dir checkpoints/clmp-small \
		--resume_from_checkpoint latest

# The index, and how well its top-1 melody fits the test captions and benchmarks/retrieval_prompts.jsonl (20 s).
$(INDEX_DONE): | $(CLMP_DONE)
	$(PY) training/build_index.py --clmp checkpoints/clmp-small --dataset $(DATASET) --output_dir checkpoints/melody-index
	$(PY) training/evaluate_retrieval.py --clmp checkpoints/clmp-small --index checkpoints/melody-index --dataset $(DATASET) \
		--prompts benchmarks/retrieval_prompts.jsonl --output_json checkpoints/melody-index/retrieval_fit.json

$(VAE_DONE): | $(DATA_DONE)
	$(LAUNCH) training/train_vae.py --config $(SMALL) --dataset $(DATASET) --output_dir checkpoints/vae-small \
		--resume_from_checkpoint latest

# MG2: pooled [text ‖ melody] FiLM, the time-aligned melody sketch (each clip's with a random sound of its own in training)
# and cross-attention to the caption's words (the small preset's text_attention). The first run builds the latent cache.
$(MG2_DONE): | $(INDEX_DONE) $(VAE_DONE)
	$(LAUNCH) training/train_mg2.py $(MG2_ARGS) --output_dir checkpoints/mg2-small

$(EVAL_DONE): | $(MG2_DONE)
	$(PY) training/evaluate.py --model checkpoints/mg2-small --dataset $(DATASET) --num_clips 32 --output_dir checkpoints/mg2-small/eval

# `make ablations`: the comparisons, same preset, data and steps: the paper's pooled-only condition and a caption-only
# model (they share one latent cache), then one evaluation with every row beside MG2's; and MG2 trained on the plain
# sketch, and without text attention (the caption as one pooled vector), each evaluated on the same clips and seeds.
$(POOLED_DONE): | $(INDEX_DONE) $(VAE_DONE)
	$(LAUNCH) training/train_mg2.py $(MG2_ARGS) --aligned_melody none --output_dir checkpoints/mg2-small-pooled

$(TEXT_DONE): | $(POOLED_DONE)
	$(LAUNCH) training/train_mg2.py $(MG2_ARGS) --condition text --output_dir checkpoints/mg2-small-text

$(ABLATIONS_DONE): | $(MG2_DONE) $(POOLED_DONE) $(TEXT_DONE)
	$(PY) training/evaluate.py --model checkpoints/mg2-small --pooled checkpoints/mg2-small-pooled --ablation checkpoints/mg2-small-text \
		--dataset $(DATASET) --num_clips 32 --output_dir checkpoints/mg2-small/eval-ablations

checkpoints/mg2-small-plain-sketch/model_index.json: | $(INDEX_DONE) $(VAE_DONE)
	$(LAUNCH) training/train_mg2.py $(MG2_ARGS) --sketch_timbre plain --output_dir checkpoints/mg2-small-plain-sketch

checkpoints/mg2-small-no-text-attention/model_index.json: | $(MG2_DONE)
	$(LAUNCH) training/train_mg2.py $(MG2_ARGS) --text_attention off --output_dir checkpoints/mg2-small-no-text-attention

checkpoints/mg2-small-%/eval/eval_results.json: | checkpoints/mg2-small-%/model_index.json
	$(PY) training/evaluate.py --model checkpoints/mg2-small-$* --dataset $(DATASET) --num_clips 32 \
		--output_dir checkpoints/mg2-small-$*/eval

ablations: install | $(ABLATIONS_DONE) $(PLAIN_SKETCH_DONE) $(NO_TEXT_ATTENTION_DONE)
	@echo "Evaluation with the ablations: checkpoints/mg2-small/eval-ablations/eval_results.md and" \
		"checkpoints/mg2-small-{plain-sketch,no-text-attention}/eval/eval_results.md"

# `make distill`: after `make demo`, a student UNet learns the demo model's guided prediction (text and melody
# guidance 3), so it generates with one UNet pass per step instead of two; then the same evaluation. 4 800 steps: at
# 1 600 family accuracy was 3.2 % below the guided 25 steps on 320 clips, at 4 800 0.6 % (within noise, a wider
# margin; docs/evaluation.md#few-step-sampling). The student trains without small.yaml's decoded-mel term, as measured.
# A student from an earlier `make distill` is kept: remove checkpoints/mg2-small-distilled to train this one.
checkpoints/mg2-small-distilled/model_index.json: | $(MG2_DONE)
	$(LAUNCH) training/train_mg2.py --config $(SMALL) --dataset $(DATASET) --pipeline checkpoints/mg2-small \
		--distill_guidance 3 --condition_dropout 0 --text_dropout 0 --melody_dropout 0 --max_train_steps 4800 \
		--decoded_spectral_weight 0 \
		--learning_rate 1e-4 --resume_from_checkpoint latest --output_dir checkpoints/mg2-small-distilled \
		$(if $(CUDA),--mixed_precision bf16,)

distill: install | checkpoints/mg2-small-distilled/eval/eval_results.json
	@echo "Evaluation of the one-pass model: checkpoints/mg2-small-distilled/eval/eval_results.md"

test: install
	# Lint and format as diffusers does (pyproject.toml [tool.ruff]: 119 columns).
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# The Space's browser test drives Debian's Chromium (never a downloaded browser).
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the Space's browser tests will fail"
	# Two workers: much of the suite is subprocess start-up (imports are single-threaded), so 2 cores finish ~1/3 sooner.
	$(PY) -m pytest -n 2 tests

# `make space`: the Space folder, ready to run or upload, with the wheels its requirements.txt installs.
space: install
	$(PY) space/build_wheels.py
	@echo "Run: MG2_MODEL=checkpoints/mg2-small $(PY) space/app.py    Upload: hf upload --repo-type space OWNER/NAME space ."

bench: install | $(INDEX_DONE) $(MG2_DONE)
	$(PIP) install -e ".[bench]"
	$(PY) benchmarks/bench_data.py --dataset_dir $(DATASET)
	$(PY) benchmarks/bench_retrieval.py --index checkpoints/melody-index --clmp checkpoints/clmp-small
	$(PY) benchmarks/bench_inference.py --model checkpoints/mg2-small
	$(PY) benchmarks/bench_codec.py
	$(PY) benchmarks/bench_training.py --clmp checkpoints/clmp-small --retriever checkpoints/melody-index
	$(PY) benchmarks/bench_space.py --model checkpoints/mg2-small

clean:
	rm -rf $(VENV) data checkpoints samples space/wheels

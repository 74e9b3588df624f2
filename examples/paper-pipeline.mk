# The authors' whole published pipeline (github carriegu0818/RCSD), stage by stage, every arrow a file:
#
#   train data with reference rubrics ─ stage I (rubric writer, LoRA) ─▶ stage1/ (adapter)
#        └─ gen-rubrics with the stage-I adapter ─▶ stage1-rubrics.parquet ─ stage II (reason-first RCSD) ─▶ stage2/
#             └─ eval: math (their grader) and science benchmarks, before and after
#
# The authors' run (8B, GPUs, vLLM):
#   make -f examples/paper-pipeline.mk TRAIN_DATA=rar-science.parquet JUDGE=Qwen/Qwen3-8B
# where rar-science.parquet = `rcsd gen-rubrics anisha2102/RaR-Science -o rar-science.parquet` (their stage-I data,
# rubrics imported). The same pipeline, small, on the embedded 135M model on a CPU (a slow test runs it):
#   make -f examples/paper-pipeline.mk SMALL=1 OUT=pipeline-small
# The 135M stage-I model cannot write valid rubrics, so the small run lets items fall back to check-based
# reference rubrics (--fallback reference, counted in the log); the full run does not.
RCSD ?= rcsd
OUT  ?= paper-pipeline
HERE := $(dir $(lastword $(MAKEFILE_LIST)))

ifeq ($(SMALL),1)
MODEL           ?= smollm2-135m-instruct
TRAIN_DATA      ?= arc-easy
DATA_ARGS       ?= --generator reference --limit 12
TINY            := --steps 2 --batch-size 4 --micro-batch-size 2 --max-new-tokens 24 --gen-batch-size 4
STAGE1          ?= --task rubric-generator --prompt-style paper --loss jsd --beta 0.5 --lora-rank 8 --lora-alpha 16 \
                   --lora-targets all-linear $(TINY)
RUBRIC_GEN      ?= --max-new-tokens 48 --retries 0 --fallback reference
STAGE2          ?= --prompt-style paper --teacher-context reason-first --analysis-max-new-tokens 16 $(TINY)
EVAL            ?= --limit 6 --max-new-tokens 32 --prompt-style paper
MATH_BENCHES    ?= gsm8k
SCIENCE_BENCHES ?= arc-easy
SCIENCE_ARGS    ?= --offset 100
else
MODEL           ?= Qwen/Qwen3-8B
TRAIN_DATA      ?= rar-science.parquet
DATA_ARGS       ?=
STAGE1          ?= --config $(HERE)recipes/paper-stage1-qwen3-8b.yaml
# their rubric generation for stage II: vLLM with the stage-I LoRA, 10,000 items, up to 2048 new tokens
RUBRIC_GEN      ?= --backend vllm --sample-size 10000 --max-new-tokens 2048 --max-failures 0
STAGE2          ?= --config $(HERE)recipes/paper-stage2-qwen3-8b.yaml --max-teacher-prompt-tokens 2048
# their math evaluation (eval/evaluate_math.py): thinking on, up to 38,912 new tokens, avg@16 at temperature
# 1.1 (the paper's setting), graded as their script grades (--grader authors on the math benches)
EVAL            ?= --n 16 --temperature 1.1 --max-new-tokens 38912 --prompt-style paper --thinking --backend vllm
MATH_BENCHES    ?= math500 aime24 aime25 hmmt25
SCIENCE_BENCHES ?= gpqa
SCIENCE_ARGS    ?=
endif

MODEL_ARG := --model $(MODEL)
EVALS := $(foreach b,$(MATH_BENCHES) $(SCIENCE_BENCHES),$(OUT)/eval-base-$(b).parquet $(OUT)/eval-stage2-$(b).parquet)

all: $(EVALS) $(if $(JUDGE),$(OUT)/stage1-rubric-quality.parquet)

$(OUT)/train-rubrics.parquet:
	mkdir -p $(OUT)
	$(RCSD) gen-rubrics $(TRAIN_DATA) $(DATA_ARGS) -o $@ --overwrite

$(OUT)/stage1/adapter_config.json: $(OUT)/train-rubrics.parquet
	$(RCSD) train $(STAGE1) $(MODEL_ARG) --rubrics $< -o $(OUT)/stage1 --overwrite

# stage I's rubrics for the training set: the adapter folder is the model (LoRA on every backend)
$(OUT)/stage1-rubrics.parquet: $(OUT)/stage1/adapter_config.json $(OUT)/train-rubrics.parquet
	$(RCSD) gen-rubrics $(OUT)/train-rubrics.parquet --generator llm --regenerate --prompt-style paper \
		--model $(OUT)/stage1 $(RUBRIC_GEN) -o $@ --overwrite

# optional (JUDGE=model): the authors' rubric-quality judge, stage-I rubrics against the reference ones
$(OUT)/stage1-rubric-quality.parquet: $(OUT)/stage1-rubrics.parquet $(OUT)/train-rubrics.parquet
	$(RCSD) eval-rubrics $< --reference $(OUT)/train-rubrics.parquet --judge-model $(JUDGE) -o $@ --overwrite

$(OUT)/stage2/rcsd_train_config.json: $(OUT)/stage1-rubrics.parquet
	$(RCSD) train $(STAGE2) $(MODEL_ARG) --rubrics $< -o $(OUT)/stage2 --overwrite

$(OUT)/eval-base-%.parquet: $(OUT)/train-rubrics.parquet
	$(RCSD) eval --bench $* $(EVAL) $(MODEL_ARG) $(if $(filter $*,$(MATH_BENCHES)),--grader authors,$(SCIENCE_ARGS)) \
		-o $@ --overwrite

$(OUT)/eval-stage2-%.parquet: $(OUT)/stage2/rcsd_train_config.json
	$(RCSD) eval --bench $* $(EVAL) --model $(OUT)/stage2 \
		$(if $(filter $*,$(MATH_BENCHES)),--grader authors,$(SCIENCE_ARGS)) -o $@ --overwrite

clean:
	rm -rf $(OUT)

.PHONY: all clean

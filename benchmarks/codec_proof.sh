# The codec trainer's proof on one GPU in one call (issue 14), within a wall-time budget:
#   1. set-up: benchmarks/gpu_setup.sh 60 (wheels, the 60-minute demo corpus);
#   2. the training loader alone (benchmarks/codec_train.py --data): samples/s, batch wait p50/p99;
#   3. the `small` step alone on synthetic audio (bf16 eager, what the GPU gives without data);
#   4. train_codec.py --config small with the real loader for THROUGHPUT_STEPS steps: samples/s,
#      median and slowest step of each log window (a periodic stall shows as max >> p50);
#   5. the hertz_dev step with torch.compile, killed after COMPILE_S seconds ("did not finish");
#   6. the tuned recipe (--config small_fast) trained until PROOF_SECONDS after the start, less
#      END_MARGIN_S for its final evaluation and save, with validation (mel distance, STOI, PESQ,
#      SI-SDR, KL bits/s) on held-out voices at the start and the end.
#
#   bash benchmarks/codec_proof.sh            # on the H200: about PROOF_SECONDS (default 530 s)
#   bash benchmarks/codec_proof.sh --smoke    # every step above on a CPU with tiny presets (~4 min)
#
# Each part prints one JSON line, {"proof": PART, ...}; logs go to $OUT/*.log (their tail is printed
# when a part fails). The tuned codec ends at $OUT/tuned/best.safetensors (best validation mel
# distance), also named in its JSON line. Environment: OUT (default /tmp/codec_proof),
# PROOF_SECONDS, COMPILE_S (default 180; 0 skips part 5), THROUGHPUT_STEPS (80), END_MARGIN_S (75),
# TUNED_OVERRIDES (more key=value for the tuned run, e.g. "stft_weight=1.0"), PARTS (the parts to
# run, default "loader step throughput compile tuned"), TUNED_DIR (the tuned run's folder, default
# $OUT/tuned), TUNED_RESUME=1 (continue the run in TUNED_DIR instead of starting afresh) and
# TUNED_MINUTES (the tuned run's max_minutes, instead of what PROOF_SECONDS leaves), PARTS=graph
# (not among the default parts: small_fast with the real loader for GRAPH_STEPS steps, 600 by
# default, with cuda_graph=false and then true; samples/s before and after the discriminators
# start; GRAPH_OVERRIDES adds settings to both), PARTS=diagnose (not among the default parts either:
# benchmarks/metric_references.py --codec on TUNED_DIR's best.safetensors, what in its
# reconstructions costs each metric, after `tuned` when both are named), PARTS=return (not among
# the default parts: TUNED_DIR's best.safetensors in parts of 16,000,000 bytes under $OUT/codec/, which
# the device tool can return up to 4 of (64 MiB in all), to be joined and diagnosed on the CPU; a
# larger codec goes as a bf16 copy, best_bf16.safetensors: small's 111 MB in 56),
# TUNED_CONFIG (on the GPU its
# preset, default small_fast; `small` for today's defaults at the same steps). The tuned run
# keeps its preset's schedule (small_fast's max_steps 9000: the learning rate decays within a
# 15-minute run).
#
# A tuned run longer than one call (a device call lasts at most 10 minutes): keep the run in the
# working tree, which a machine still warm keeps between calls, and call again at once:
#   PARTS=tuned TUNED_DIR=checkpoints/codec_proof TUNED_MINUTES=7.5 bash benchmarks/codec_proof.sh
#   PARTS=tuned TUNED_DIR=checkpoints/codec_proof TUNED_RESUME=1 TUNED_MINUTES=7.5 bash benchmarks/codec_proof.sh
# (about 505 s and 495 s of command time on one H200; the proof of 2026-12-06 ran TUNED_MINUTES=6.5
# then 8.5, 487 s and 564 s of command time on one H100, the first call after a 51 s test run).
# The second call's `tuned` line covers the whole run (its first evaluation is the first call's).
#
# A recipe screen at equal steps: each arm a tuned run stopped at the same step on small_fast's own
# schedule (stop_step), its end evaluated there, e.g. (about 500 s each on one H200):
#   PARTS=tuned TUNED_DIR=checkpoints/arm_adv2 TUNED_MINUTES=20 \
#     TUNED_OVERRIDES="stop_step=2275 adv_weight=2" bash benchmarks/codec_proof.sh
set -u
start=$(date +%s)
OUT=${OUT:-/tmp/codec_proof}
mkdir -p "$OUT"
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1
  PROOF_SECONDS=${PROOF_SECONDS:-240} COMPILE_S=${COMPILE_S:-15} THROUGHPUT_STEPS=${THROUGHPUT_STEPS:-4}
  END_MARGIN_S=${END_MARGIN_S:-30}
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  python3 data/demo/prepare.py --minutes 2 --seed 0 --engines espeak --out "$OUT/demo" > "$OUT/setup.log" 2>&1
  DATA=$OUT/demo
  COMMON="device=cpu wandb=disabled resume=false train_data_path=$DATA/train val_data_path=$DATA/val"
  SMALL="--config tiny $COMMON num_workers=2"
  TUNED="--config tiny $COMMON max_steps=100000 log_interval=2 eval_interval=100000 save_interval=100000 val_crops=8"
  STEP_ARGS="--device cpu --presets tiny --modes fp32-eager --batch 2 --seconds 1 --warmup 1 --steps 2"
  COMPILE_ARGS="--device cpu --presets tiny --modes bf16-compile --batch 2 --seconds 1 --warmup 1 --steps 1"
  LOADER_ARGS="--presets tiny --workers 2 --batches 20"
else
  SMOKE=0
  PROOF_SECONDS=${PROOF_SECONDS:-530} COMPILE_S=${COMPILE_S:-180} THROUGHPUT_STEPS=${THROUGHPUT_STEPS:-80}
  END_MARGIN_S=${END_MARGIN_S:-75}
  source benchmarks/gpu_setup.sh 60 > "$OUT/setup.log" 2>&1
  DATA=data/demo
  COMMON="device=cuda wandb=disabled resume=false train_data_path=$DATA/train val_data_path=$DATA/val"
  SMALL="--config small $COMMON num_workers=6"
  TUNED="--config ${TUNED_CONFIG:-small_fast} $COMMON eval_interval=100000 save_interval=500 val_crops=64"
  STEP_ARGS="--presets small --modes bf16-eager --warmup 2 --steps 6"
  COMPILE_ARGS="--presets hertz_dev --modes bf16-compile --warmup 2 --steps 5"
  LOADER_ARGS="--presets small --workers 6 --batches 80"
fi
PARTS=${PARTS:-loader step throughput compile tuned}
GRAPH_STEPS=${GRAPH_STEPS:-600}
TUNED_DIR=${TUNED_DIR:-$OUT/tuned}
TUNED_RESUME=${TUNED_RESUME:-0}
[ "$TUNED_RESUME" = 1 ] && TUNED=${TUNED/resume=false/resume=true}
elapsed() { echo $(( $(date +%s) - start )); }
wanted() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
failed() {  # part, log: a JSON line saying so, and the log's tail on stderr
  python3 -c 'import json, sys; print(json.dumps({"proof": sys.argv[1], "error": "failed, see " + sys.argv[2]}))' "$1" "$2"
  tail -20 "$2" >&2
}
python3 -c 'import importlib.util as u, json, sys
print(json.dumps({"proof": "setup", "smoke": bool(int(sys.argv[1])), "elapsed_s": int(sys.argv[2]),
                  **{m: u.find_spec(m) is not None for m in ("pystoi", "pesq", "soundfile", "soxr")}}))' \
  "$SMOKE" "$(elapsed)"

# 2. the loader alone
wanted loader && { python3 benchmarks/codec_train.py --data "$DATA/train" $LOADER_ARGS > "$OUT/loader.log" 2>&1 \
  && grep '^{' "$OUT/loader.log" | sed 's/^{/{"proof": "loader", /' || failed loader "$OUT/loader.log"; }

# 3. the small step alone, synthetic audio
wanted step && { python3 benchmarks/codec_train.py $STEP_ARGS > "$OUT/step.log" 2>&1 \
  && grep '^{' "$OUT/step.log" | sed 's/^{/{"proof": "step_synthetic", /' || failed step_synthetic "$OUT/step.log"; }

# 4. the trainer with the real loader
if wanted throughput; then
python3 train_codec.py $SMALL max_steps=$THROUGHPUT_STEPS log_interval=$(( THROUGHPUT_STEPS / 4 )) \
  eval_interval=100000 save_interval=100000 val_crops=8 checkpoint_dir="$OUT/throughput" \
  > "$OUT/throughput.log" 2>&1 || failed throughput "$OUT/throughput.log"
python3 - "$OUT/throughput/metrics.jsonl" "${SMALL%% device=*}" <<'EOF' || failed throughput_report "$OUT/throughput.log"
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "perf/samples_per_s" in r]
steady = rows[1:] or rows  # the first window includes cuDNN's autotuning and the workers' start
print(json.dumps({"proof": "throughput", "run": sys.argv[2] + " (real loader)", "steps": rows[-1]["step"],
                  "samples_per_s": round(statistics.mean(r["perf/samples_per_s"] for r in steady), 1),
                  "samples_per_s_windows": [round(r["perf/samples_per_s"], 1) for r in rows],
                  "step_s_p50": round(statistics.median(r["perf/step_s_p50"] for r in steady), 4),
                  "step_s_max_windows": [round(r["perf/step_s_max"], 3) for r in rows],
                  "gpu_mem_gb": rows[-1].get("perf/gpu_mem_gb")}))
EOF
fi

# 4b. (PARTS=graph only) small_fast's step with the real loader, cuda_graph off then on, GRAPH_STEPS steps
if wanted graph; then
for graph in false true; do
  python3 train_codec.py --config small_fast ${COMMON} cuda_graph=$graph max_steps=$GRAPH_STEPS log_interval=25 \
    eval_interval=100000 save_interval=100000 val_crops=8 checkpoint_dir="$OUT/graph_$graph" ${GRAPH_OVERRIDES:-} \
    > "$OUT/graph_$graph.log" 2>&1 || failed "graph_$graph" "$OUT/graph_$graph.log"
  python3 - "$OUT/graph_$graph/metrics.jsonl" "$graph" <<'EOF2' || failed graph_report "$OUT/graph_$graph.log"
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "perf/samples_per_s" in r]
disc = [r for r in rows if "loss/disc" in r][1:]  # the first window with the discriminators holds their warm-up
mel_only = [r for r in rows if "loss/disc" not in r][1:]  # the first holds cuDNN's trials
mean = lambda rs, k: round(statistics.mean(r[k] for r in rs), 4) if rs else None
print(json.dumps({"proof": "graph", "cuda_graph": sys.argv[2] == "true", "steps": rows[-1]["step"],
                  "samples_per_s_with_disc": mean(disc, "perf/samples_per_s"),
                  "step_s_p50_with_disc": mean(disc, "perf/step_s_p50"),
                  "samples_per_s_mel_only": mean(mel_only, "perf/samples_per_s"),
                  "step_s_p50_mel_only": mean(mel_only, "perf/step_s_p50"),
                  "samples_per_s_windows": [round(r["perf/samples_per_s"], 1) for r in rows],
                  "loss_total_last": round(rows[-1]["loss/total"], 3), "gpu_mem_gb": rows[-1].get("perf/gpu_mem_gb")}))
EOF2
done
fi

# 5. hertz_dev with compile, capped (COMPILE_S=0 skips it)
if wanted compile && [ "$COMPILE_S" -le 0 ]; then
  echo '{"proof": "compile", "skipped": "COMPILE_S=0"}'
elif wanted compile; then
  timeout --kill-after=10 "$COMPILE_S" python3 benchmarks/codec_train.py $COMPILE_ARGS > "$OUT/compile.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "{\"proof\": \"compile\", \"error\": \"did not finish compiling in $COMPILE_S s\"}"
  elif [ $rc -eq 0 ]; then
    grep '^{' "$OUT/compile.log" | sed 's/^{/{"proof": "compile", /'
  else
    failed compile "$OUT/compile.log"
  fi
fi

# 6. the tuned recipe for the remaining time
if wanted tuned; then
minutes=${TUNED_MINUTES:-$(python3 -c "print(round(max($PROOF_SECONDS - $(elapsed) - $END_MARGIN_S, 30) / 60, 2))")}
echo "{\"proof\": \"tuned_start\", \"elapsed_s\": $(elapsed), \"max_minutes\": $minutes}"
python3 train_codec.py $TUNED max_minutes=$minutes checkpoint_dir="$TUNED_DIR" ${TUNED_OVERRIDES:-} \
  > "$OUT/tuned.log" 2>&1 || failed tuned "$OUT/tuned.log"
python3 - "$TUNED_DIR" <<'EOF' || failed tuned_report "$OUT/tuned.log"
import json, os, statistics, sys
run = sys.argv[1]
rows = list(map(json.loads, open(os.path.join(run, "metrics.jsonl"))))
vals = [r for r in rows if "val/mel_distance" in r]
train = [r for r in rows if "perf/samples_per_s" in r]
keys = ("val/mel_distance", "val/stoi", "val/pesq", "val/si_sdr", "val/kl_bits_per_s")
# with ema_decay, val/ is the weight average's and (val_raw=true) raw_* the training weights'
num = lambda v: v if v is None else round(v, 4)  # (null: a NaN or inf)
pick = lambda r: {"step": r["step"], **{k.split("/")[1]: num(r[k]) for k in keys if k in r},
                  **{"raw_" + k.split("/")[1]: num(r[k.replace("val/", "val_raw/")]) for k in keys
                     if k.replace("val/", "val_raw/") in r}}
best = min(vals, key=lambda r: (r["val/mel_distance"] is None, r["val/mel_distance"] or 0))
print(json.dumps({"proof": "tuned", "start": pick(vals[0]), "end": pick(vals[-1]), "best": pick(best),
                  "steps": rows[-1]["step"], "samples_per_s": round(statistics.mean(r["perf/samples_per_s"]
                                                                                     for r in train[1:] or train), 1),
                  "codec": os.path.abspath(os.path.join(run, "best.safetensors")),
                  "codec_exists": os.path.isfile(os.path.join(run, "best.safetensors"))}))
EOF
fi

# 6b. (PARTS=diagnose only; after `tuned` when both run) what in the tuned codec's reconstructions costs
# each metric (benchmarks/metric_references.py --codec: its band, magnitude or phase, pauses; CPU)
if wanted diagnose; then
  python3 benchmarks/metric_references.py --val "$DATA/val" --crops 64 --iterations --codec "$TUNED_DIR/best.safetensors" \
    > "$OUT/diagnose.log" 2>&1 && grep '^{' "$OUT/diagnose.log" | sed 's/^{/{"proof": "diagnose", /' \
    || failed diagnose "$OUT/diagnose.log"
fi
# 6c. (PARTS=return only) the tuned codec back to the caller: the device tool returns at most 8 files of at
# most 16 MiB, 64 MiB in all, so TUNED_DIR's best.safetensors goes to $OUT/codec/ in parts of 16,000,000
# bytes, its md5 in the JSON line, when it fits in 4; a larger one (small's, 111 MB: session 32 got 4 of its
# 7 parts back, benchmarks/results/h100_session32.txt) as a bf16 copy (best_bf16.safetensors, 56 MB; its
# weights within bf16's rounding, 0.4% of each tensor's largest), and one over 64 MiB even in bf16 is
# refused (diagnose it on the device, PARTS=diagnose).
# RETURN_DIR puts them elsewhere: the device
# tool returns what is under its own $OUT, where this script's logs would crowd them out, so call it as
#   RETURN_DIR=$OUT OUT=/tmp/codec_proof PARTS="tuned return" ... bash benchmarks/codec_proof.sh
# Join them where they land
# (cat best*.safetensors.part* > best.safetensors; md5sum) and diagnose it there on the CPU
# (metric_references.py --codec) instead of with device time
if wanted return; then
  RETURN_DIR=${RETURN_DIR:-$OUT/codec}
  rm -f "$RETURN_DIR"/best*.safetensors.part* && mkdir -p "$RETURN_DIR"
  send=$TUNED_DIR/best.safetensors
  if [ ! -f "$send" ]; then
    echo '{"proof": "return", "error": "no best.safetensors in '"$TUNED_DIR"'"}'
    send=
  elif [ "$(stat -c %s "$send")" -gt $(( 4 * 16000000 )) ]; then
    # a bf16 copy (half the bytes: small's 111 MB codec in 56 MB), a codec file like any other
    send=$TUNED_DIR/best_bf16.safetensors
    python3 -c 'import sys, torch
from model.loading import load_codec, write_codec
write_codec(sys.argv[2], load_codec(sys.argv[1], dtype=torch.bfloat16), label=sys.argv[2])' "$TUNED_DIR/best.safetensors" "$send" \
      > "$OUT/return.log" 2>&1 || { failed return "$OUT/return.log"; send=; }
    if [ -n "$send" ] && [ "$(stat -c %s "$send")" -gt $(( 4 * 16000000 )) ]; then
      echo '{"proof": "return", "error": "even in bf16 the codec is over the 64 MiB the device tool returns: run PARTS=diagnose on the device"}'
      send=
    fi
  fi
  if [ -n "$send" ]; then
    name=$(basename "$send")
    split -b 16000000 -d "$send" "$RETURN_DIR/$name.part"
    python3 -c 'import glob, hashlib, json, os, sys
parts = sorted(glob.glob(os.path.join(sys.argv[1], sys.argv[3] + ".part*")))
md5 = hashlib.md5(open(sys.argv[2], "rb").read()).hexdigest()
print(json.dumps({"proof": "return", "file": sys.argv[3], "parts": parts,
                  "bytes": sum(os.path.getsize(p) for p in parts), "md5": md5}))' "$RETURN_DIR" "$send" "$name"
  fi
fi
echo "{\"proof\": \"done\", \"elapsed_s\": $(elapsed)}"

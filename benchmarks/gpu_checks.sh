#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one command, on a machine with one GPU (docs/gpu.md#the-gpu-checks):
#   bash benchmarks/gpu_checks.sh OUT
#   GPU_CHECKS_STEPS="jpeg_folder throughput_gpu_aug" bash benchmarks/gpu_checks.sh OUT    # some steps only
#   GPU_CHECKS_TINY=1 bash benchmarks/gpu_checks.sh OUT    # every step tiny, on the CPU: do the steps run?
# Steps, in order, each under its own time limit (`timeout`), its output in OUT/<step>.log:
#   jpeg_folder            ImageNet-like JPEGs (about 500 x 375) from the synthetic scenes, for the next two
#   throughput_gpu_aug     ResNet-50/224, batch 256, bf16 + channels_last, queue 65536, DenseCL: views resident on
#                          the GPU, then the JPEG folder with data.augment_on=gpu, side by side in one process
#   throughput_cpu_aug     the same JPEG folder, PIL augmentation in min(16, nproc) data workers
#   step_overhead          the DenseCL / MoCo v2 step-time ratio at the same size
#   chain                  pretrain (AMP) -> convert -> det_voc, det_coco, seg_voc through the pipeline, a few
#                          hundred iterations each
#   mini_paper_gpu         the 9-job sweep of conf/experiment/mini_paper_gpu.yaml, then its report table
#   mini_paper_gpu_report
# A failed or timed-out step is recorded as such and the next one runs. OUT/machine.txt: GPU, driver, versions,
# CPUs. OUT/summary.txt: one line per figure (benchmarks/gpu_checks_figures.py: step, status, value, unit,
# target, seconds), written as the steps finish. Runs from the repository root without installing the package.
set -uo pipefail
out=${1:-benchmark_output}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
tiny=${GPU_CHECKS_TINY:-0}
all_steps="jpeg_folder throughput_gpu_aug throughput_cpu_aug step_overhead chain mini_paper_gpu mini_paper_gpu_report"
steps=${GPU_CHECKS_STEPS:-$all_steps}
cpus=$(nproc)
workers=$(( cpus < 16 ? cpus : 16 ))
summary=$out/summary.txt
jpegs=$out/jpeg_folder
chain_stages=pretrain,convert,det_voc,det_coco,seg_voc  # pipelines/registry.py names

# ------------------------------------------------------------------------------------------- the two sizes
# pipeline overrides that shrink every stage to seconds (as tests/test_pipeline.py's TINY), in fp32 (bf16 is
# several times slower than fp32 on a CPU without AVX512-BF16), without the feature-quality and correspondence
# evaluations during pre-training (tests/test_pipeline.py runs them)
tiny_chain=(
  pretrain.iters=4 pretrain.batch_size=4 pretrain.queue_len=16 pretrain.crop_size=64 pretrain.log_every=4
  pretrain.ckpt_every=100 pretrain.eval_every=0 pretrain.corr_eval_crop=null pretrain.warmup_iters=0
  data.num_images=16 pretrain.figure.num_images=1 pretrain.figure.crop_size=64 pretrain.amp=none
  downstream.synthetic.num_train=8 downstream.synthetic.num_val=4
  downstream.probe.image_size=64 downstream.probe.input_size=64 downstream.probe.num_train=8
  downstream.probe.num_val=4 downstream.probe.epochs=1 ++downstream.probe.batch_size=4
)
for stage in det_voc det_coco; do
  tiny_chain+=(
    ++downstream.$stage.amp=none downstream.$stage.max_iter=1 downstream.$stage.ims_per_batch=2
    ++downstream.$stage.precise_bn=false downstream.$stage.num_workers=0 "++downstream.$stage.min_size_train=[96]"
    ++downstream.$stage.max_size_train=128 ++downstream.$stage.min_size_test=96 ++downstream.$stage.max_size_test=128
    downstream.$stage.rpn_post_nms_topk_test=10 ++downstream.$stage.detections_per_image=10
  )
done
tiny_chain+=(
  ++downstream.seg_voc.amp=none downstream.seg_voc.max_iter=1 downstream.seg_voc.ims_per_batch=2
  downstream.seg_voc.num_workers=0 ++downstream.seg_voc.crop_size=64 "++downstream.seg_voc.img_scale=[320,80]"
)
if [ "$tiny" = 1 ]; then
  device=cpu
  export OMP_NUM_THREADS=1  # tiny convolutions: one thread is several times faster on a small, shared CPU
  limit_short=240 limit_long=300
  jpeg_args=(--num 48 --width 96 --height 72 --scene-size 64 --workers "$workers")
  size_args=(--arch resnet18 --size 64 --batch 8 --queue-len 64 --amp none --device cpu --threads 1)
  timed_steps=(--warmup 3 --iters 2)
  overhead_args=(--arch resnet18 --size 64 --batch 4 --queue-len 16 --iters 1 --warmup 1 --device cpu --threads 1)
  chain_args=("${tiny_chain[@]}")
  # seed 0 only (3 jobs, side by side as the preset launches them), pre-training and probe: the chain checks the
  # other stages
  mini_args=("${tiny_chain[@]}" hydra.sweeper.params.seed=0 "stages=[pretrain,probe]" pretrain.num_workers=0)
  mini_jobs=3
else
  device=cuda
  limit_short=600 limit_long=900
  # 100 batches: no image repeats within the timed steps
  jpeg_args=(--num 25600 --workers "$workers")
  size_args=(--arch resnet50 --size 224 --batch 256 --queue-len 65536 --amp bf16 --device cuda)
  # 40 untimed steps drain what the workers prefetched while the model was built (2 batches per worker)
  timed_steps=(--warmup 40 --iters 60)
  overhead_args=(--arch resnet50 --size 224 --batch 256 --queue-len 65536 --amp bf16 --iters 10 --device cuda)
  # the default run's chain (ResNet-18, 96 px, batch 32, downstream=first_run) at 300 iterations per stage, bf16
  chain_args=(pretrain.amp=bf16 pretrain.channels_last=true pretrain.iters=300 data.num_images=9600
              pretrain.num_workers="$workers")
  for stage in det_voc det_coco seg_voc; do
    chain_args+=(downstream.$stage.max_iter=300 ++downstream.$stage.amp=bf16)
  done
  mini_args=()
  mini_jobs=9
fi

# ------------------------------------------------------------------------------------------------ running
summary_line() {  # STEP STATUS DETAIL: a line for a step whose figures could not be read
  echo "step=$1 status=$2 figure=- value=nan unit=- target=none met=n/a seconds=0 limit=0 | $3" | tee -a "$summary"
}

run_step() {  # NAME LIMIT COMMAND...: output to OUT/NAME.log, figures to the summary; never stops the script
  local name=$1 limit=$2 start rc seconds extra=()
  shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit $limit s): $*"
  start=$(date +%s.%N)
  timeout -k 30 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
  [ "$tiny" = 1 ] && extra+=(--tiny)
  [ "$name" = chain ] && extra+=(--stages "$chain_stages")
  python3 benchmarks/gpu_checks_figures.py "$name" "$out" --rc "$rc" --seconds "$seconds" --limit "$limit" \
    --jobs "$mini_jobs" "${extra[@]}" 2>>"$out/$name.log" | tee -a "$summary"
  [ "${PIPESTATUS[0]}" = 0 ] || summary_line "$name" failed "the figures of this step could not be read (rc $rc)"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $([ "$tiny" = 1 ] && echo tiny || echo real)"
  changes=$(git status --porcelain 2>/dev/null | grep -c . || true)
  echo "code: $(git rev-parse HEAD 2>/dev/null || echo unknown), $changes files changed or new"
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  python3 -c "
import torch, torchvision
print('torch:', torch.__version__, 'torchvision:', torchvision.__version__, 'cuda:', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'torch sees: {p.name}, {p.total_memory // 2**20} MiB, {torch.cuda.device_count()} device(s)')
"
  echo "cpus: $cpus"
  echo "data workers: $workers"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
echo "# step status figure value unit target met seconds limit | detail ($(date -u +%Y-%m-%dT%H:%M:%SZ))" >"$summary"

run_step jpeg_folder "$limit_short" python3 benchmarks/write_jpeg_folder.py "$jpegs" "${jpeg_args[@]}"
run_step throughput_gpu_aug "$limit_short" python3 benchmarks/pretrain_throughput.py "${size_args[@]}" \
  "${timed_steps[@]}" --mode both --source "$jpegs" --augment-on gpu --workers "$workers"
run_step throughput_cpu_aug "$limit_short" python3 benchmarks/pretrain_throughput.py "${size_args[@]}" \
  "${timed_steps[@]}" --mode pipeline --source "$jpegs" --augment-on cpu --workers "$workers"
run_step step_overhead "$limit_short" python3 benchmarks/step_overhead.py "${overhead_args[@]}"
run_step chain "$limit_long" python3 -m pipelines.run name=gpu_chain device="$device" \
  "stages=[$chain_stages]" "${chain_args[@]}" paths.output_dir="$out/chain"
mini=(+experiment=mini_paper_gpu device="$device" "${mini_args[@]}" paths.output_dir="$out/mini_paper_gpu")
run_step mini_paper_gpu "$limit_long" env OMP_NUM_THREADS=1 python3 -m pipelines.run "${mini[@]}" -m
run_step mini_paper_gpu_report "$limit_short" python3 -m pipelines.report "${mini[@]}" \
  --out "$out/mini_paper_gpu_report" --no-log

ok=$(grep -c ' status=ok ' "$summary")
all=$(grep -vc '^#' "$summary")
echo "# $ok of $all figures ok" | tee -a "$summary"

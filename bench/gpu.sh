#!/usr/bin/env bash
# The GPU check, in one script that fits a short device session (about 8 minutes on one GPU):
#
#     bash bench/gpu.sh            # from the repository root, on a machine with a CUDA GPU
#
# Runs the project from its checkout (PYTHONPATH=.), installing nothing: the device machine has torch,
# transformers, peft, typer, rich and pyyaml but no nltk (nothing here needs it) and no network.
#   1. the tests that can use CUDA (device selection, precision, RNG state);
#   2. `llmctl train` on CUDA: the quickstart config with bf16 autocast, with fp16 and loss scaling, and the
#      lean GPT-2 path; SFT of configs/sft.yaml for a few steps;
#   3. torchrun with nccl, one process;
#   4. `llmctl generate` on CUDA (bf16 and fp32), and the generate benchmark's GPT-2 124M case on the GPU against
#      model.generate.
# Each step prints one line starting with "gpu.sh:" and its outcome; figures go to $OUT/gpu.txt when $OUT is set.
# GPU_SH_DEVICE=cpu runs the same steps on the CPU (slowly, shortened): a check of the script itself where no GPU is.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LLMCTL_DEBUG=1
OUT=${OUT:-$(mktemp -d)}
LOG=$OUT/gpu.txt
WORK=$(mktemp -d)
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then
    echo "gpu.sh: $name ok ($((SECONDS - start)) s)" | tee -a "$LOG"
  else
    echo "gpu.sh: $name FAILED (exit $?, $((SECONDS - start)) s); last lines:" | tee -a "$LOG"
    tail -n 15 "$WORK/$name.log" | tee -a "$LOG"
    failed=1
  fi
}

DEV=${GPU_SH_DEVICE:-cuda}
STEPS=60; [ "$DEV" = cpu ] && STEPS=4
if [ "$DEV" = cuda ]; then
  python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>/dev/null \
    | tee -a "$LOG" | grep -q . || { echo "gpu.sh: no CUDA device here (GPU_SH_DEVICE=cpu checks the steps)"; exit 1; }
fi

# 1. Tests that touch CUDA.
if python -c "import pytest" 2>/dev/null; then
  step tests 120 python -m pytest -q -x tests/core/test_device.py
fi

# 2. Training on CUDA, on the quickstart's own data (Python's pydoc topics: always offline).
common=(-c configs/quickstart.yaml --set data.dir="$WORK/prepared" --set train.max_steps=$STEPS
        --set train.eval_interval=30 --set run.device=$DEV)
step train-bf16 180 python -m llmctl train "${common[@]}" --set run.out_dir="$WORK/bf16" --set train.precision=bf16
step train-fp16 180 python -m llmctl train "${common[@]}" --set run.out_dir="$WORK/fp16" --set train.precision=fp16
step train-sft 180 python -m llmctl train -c configs/sft.yaml --set run.device=$DEV --set train.max_steps=$STEPS \
  --set run.out_dir="$WORK/sft"
# 3. torchrun with nccl, one process
step torchrun-nccl 180 torchrun --standalone --nproc_per_node 1 -m llmctl train "${common[@]}" \
  --set run.out_dir="$WORK/ddp"
# 4. generate on CUDA from the trained run, in bf16 and fp32
for precision in bf16 fp32; do
  step "generate-$precision" 60 sh -c "printf 'A generator function\nThe with statement\n' | python -m llmctl \
    generate -m '$WORK/bf16' -n 32 --set run.device=$DEV --set generate.precision=$precision"
done

# The generate benchmark's GPT-2 124M case on the GPU (model.generate against llmctl, in process).
step bench-124m 300 env DEV="$DEV" python - <<'EOF'
import os, sys, time
import torch
sys.path.insert(0, "bench")
import bench_generate as b
from llmctl.core.decode import Decoder, Finished, Request, SamplingParams
from llmctl.core.model import load_model, load_tokenizer
import tempfile

device = os.environ["DEV"]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
with tempfile.TemporaryDirectory() as tmp:
    b.save_gpt2(tmp, 12, 12, 768, vocab=50257)
    tokenizer = load_tokenizer(tmp)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tmp, dtype=dtype).to(device).eval()
        model.generation_config.eos_token_id = None
        prompts = [torch.randint(0, 50256, (16,)).tolist() for _ in range(8)]
        sampled = dict(do_sample=True, top_k=50, top_p=0.95)
        for batch in (1, 8):
            ids = torch.tensor(prompts[:batch], device=device)
            def hf():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, pad_token_id=0, **sampled)
                sync()
            def ours():
                d = Decoder(model, tokenizer, ignore_eos=True)
                p = SamplingParams(max_new_tokens=64, temperature=1.0, top_k=50, top_p=0.95)
                list(d.generate([Request(x, p, i) for i, x in enumerate(prompts[:batch])]))
                sync()
            if device == "cuda":
                hf_t, our_t = b.best_of(2, hf, ours)
            else:  # a check of the code only: one run each, no figures
                hf(), ours()
                hf_t = our_t = float("nan")
            print(f"gpu.sh: GPT-2 124M {str(dtype)[6:]} batch {batch}: model.generate {64 * batch / hf_t:.0f} t/s, "
                  f"llmctl {64 * batch / our_t:.0f} t/s, {hf_t / our_t:.2f}x")
EOF
grep -h "gpu.sh: GPT-2" "$WORK/bench-124m.log" | tee -a "$LOG"
echo "gpu.sh: done, $([ $failed = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED'); figures in $LOG"
exit $failed

#!/usr/bin/env bash
# The checks that need a GPU, in one call of the lent machine (docs/agent.md, the memory tier on a GPU): the gpu tests,
# whether NCCL runs two ranks on one GPU, the CUDA snapshot bench, and the CPU snapshot bench on that
# machine's cores. Wheels of the packages its image lacks travel in .whl/ (listed in .git/info/exclude, carried
# by the device tool), made here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     crc32c donfig lark numcodecs pyeclib zarr google-crc32c
# Logs and JSON lines go to $OUT.
set -u
OUT=${OUT:-/tmp/ucp-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
step() { echo "=== $1 ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"; }
step env
nvidia-smi -L; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
step "gpu tests"
timeout 240 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
step "nccl: two ranks on one gpu"
cat > /tmp/nccl_probe.py <<'PY'
import os, torch, torch.distributed as dist, torch.multiprocessing as mp
def f(rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    t = torch.ones(4, device="cuda") * (rank + 1)
    dist.all_reduce(t)
    print("rank", rank, "all_reduce", t.tolist(), flush=True)
    dist.destroy_process_group()
if __name__ == "__main__":
    mp.spawn(f, nprocs=2)
PY
timeout 60 python3 /tmp/nccl_probe.py > "$OUT/nccl.log" 2>&1; echo "rc $?"
grep -i -m6 "duplicate\|nccl warn\|invalid usage\|error:\|all_reduce" "$OUT/nccl.log"
step "bench_cuda_snapshot"
timeout 200 python3 tools/bench_cuda_snapshot.py ${CUDA_BENCH_ARGS:-} > "$OUT/bench_cuda.json" 2> "$OUT/bench_cuda.log"
echo "rc $?"; tail -4 "$OUT/bench_cuda.log"; cat "$OUT/bench_cuda.json"
step "bench_snapshot (cpu, this machine's cores)"
timeout ${CPU_BENCH_S:-200} python3 tools/bench_snapshot.py ${CPU_BENCH_ARGS:---size-mb 1000 --steps 4 --rounds 2 --repeats 3} \
  > "$OUT/bench_snapshot.json" 2> "$OUT/bench_snapshot.log"
echo "rc $?"; tail -3 "$OUT/bench_snapshot.log"; head -c 3000 "$OUT/bench_snapshot.json"; echo
step done

#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU and a PyTorch that sees it:
#   1. the `clip_smoke` profile's seven chapters with `device: cuda` (params/clip_smoke_cuda, a profile that
#      extends clip_smoke's benchmark block, made here and removed afterwards), timed per chapter by mergelab.report;
#   2. the TSV-M benchmark (perf/bench_tsv.py --device cuda);
#   3. the unit tests that branch on CUDA (device choice, mixed precision).
# Usage: perf/gpu_check.sh OUT_DIR [PARTS]   PARTS: any of clip, bench, tests (default: all three)
#   (OUT_DIR receives gpu_check.log, clip_smoke_cuda.tgz with results, timings and any failed notebook,
#   bench_tsv.log)
# CHAPTERS=notebooks/00_benchmark_and_baselines.ipynb (say) runs only those chapters of part 1 (the book then stays
# unrendered). Python packages the machine lacks can come as wheels in .whl/ (installed into /tmp/site, PYTHONPATH).
set -uo pipefail
out=${1:?usage: perf/gpu_check.sh OUT_DIR [PARTS]}
parts=${2:-clip,bench,tests}
mkdir -p "$out" && out=$(cd "$out" && pwd)
exec > >(tee "$out/gpu_check.log") 2>&1
fail=0  # the exit status: 1 when any check failed
trap 'rm -rf params/clip_smoke_cuda' EXIT  # the made-up profile never outlives the run
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0)); print('open_clip', open_clip.__version__)"
nproc

# the project's kernel, where papermill finds it
export JUPYTER_PATH=/tmp/jupyter/share/jupyter
$py -m ipykernel install --prefix /tmp/jupyter --name mergelab --display-name "Python (mergelab)" >/dev/null

if [[ $parts == *clip* ]]; then
echo "== 1. clip_smoke on the GPU"
rm -rf params/clip_smoke_cuda /tmp/r_cuda && mkdir params/clip_smoke_cuda
cp params/clip_smoke/0*.yaml params/clip_smoke_cuda/  # the chapters' own keys; the benchmark block extends clip_smoke's
printf 'extends: clip_smoke\nprofile: clip_smoke_cuda\ndevice: cuda\n' > params/clip_smoke_cuda/_benchmark.yaml
start=$(date +%s)
pandoc=no  # pypandoc-binary's wheel (34 MB) may not fit the transfer; the book's rendering needs no GPU
$py -c "import pypandoc; pypandoc.get_pandoc_path()" >/dev/null 2>&1 && pandoc=yes
for nb in ${CHAPTERS:-notebooks/0*.ipynb}; do  # one chapter at a time, so that one failure does not hide the next
    name=$(basename "$nb" .ipynb)
    timeout 200 $py -m mergelab.report --profile clip_smoke_cuda --reports /tmp/r_cuda --force --renderer pandoc \
        --notebooks "$name" 2>&1 | tr '\r' '\n' | grep -v '^Executing:'
    rc=${PIPESTATUS[0]}
    # the chapter that completes the set also renders the book; without pandoc only that step fails
    [[ $rc != 0 && $pandoc == no && -f /tmp/r_cuda/results/$name.json ]] && rc="0 (executed; the book's rendering failed: no pandoc)"
    echo "clip_smoke_cuda $name: rc $rc"
    [[ $rc == 0* ]] || fail=1
done
if [[ -n ${CHAPTERS:-} ]]; then
    echo "CHAPTERS was set: the book is not rendered"
elif [[ $pandoc == yes ]]; then
    timeout 100 $py -m mergelab.report --profile clip_smoke_cuda --reports /tmp/r_cuda --renderer pandoc 2>&1 | tail -3
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "the book did not render"; fail=1; }
else
    echo "no pandoc on this machine: the chapters ran, the book was not rendered here"
fi
echo "clip_smoke_cuda: all chapters (and the book, where rendered) in $(( $(date +%s) - start )) s"
(cd /tmp/r_cuda && tar -czf "$out/clip_smoke_cuda.tgz" $(ls -d results timings *.failed.ipynb 2>/dev/null))
rm -rf params/clip_smoke_cuda
fi

if [[ $parts == *bench* ]]; then
echo "== 2. TSV-M benchmark on the GPU"
(cd perf && timeout 200 $py bench_tsv.py --device cuda --tasks 8 20 --repeat 3) 2>&1 | tee "$out/bench_tsv.log"
[[ ${PIPESTATUS[0]} == 0 ]] || fail=1
fi

if [[ $parts == *tests* ]]; then
echo "== 3. CUDA branches of the unit tests"
timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_clip_protocol.py tests/test_training_and_utils.py -k "device or amp or cuda" 2>&1 | tail -5
[[ ${PIPESTATUS[0]} == 0 ]] || fail=1
fi
exit $fail

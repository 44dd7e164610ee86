#!/usr/bin/env bash
# The README's "Where co-distillation helps" tables: every experiment, one after another, on this machine's CPU.
# Each report lands in ~/codistill/experiments/<name>/ and is copied to bench/results/experiments/<name>/.
#   bash bench/evidence.sh [fmnist|shakespeare|cifar|all]        (all: about 90 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/datasets}
WHAT=${1:-all}
COMMON=(--max-concurrent 2 --set tracking.backend=none --set resources.num_cpus=0.45 --set resources.threads_per_peer=1)

experiment() {  # name, then the experiment's own arguments; one begun before is finished (--resume)
    local name=$1; shift
    if [[ ! -d ~/codistill/experiments/$name ]]; then
        python -m codistill.experiment --name "$name" "${COMMON[@]}" "$@" > "/tmp/evidence-$name.log" 2>&1 || true
    fi
    python -m codistill.experiment --name "$name" --resume "${COMMON[@]}" "$@" >> "/tmp/evidence-$name.log" 2>&1
    mkdir -p "bench/results/experiments/$name"
    cp ~/codistill/experiments/"$name"/report.{md,json,png} "bench/results/experiments/$name/"
    echo "$name done: bench/results/experiments/$name/report.md"
}

FMNIST=(--config fmnist_small --seeds 5
    --set "data.train=$DATA/fashion_mnist/train.parquet" --set "data.test=$DATA/fashion_mnist/test.parquet"
    --arm "independent: loss.alpha=0" --arm "dml_T1:" --arm "ckpt_p50: exchange.mode=checkpoint exchange.period=50")
if [[ $WHAT == fmnist || $WHAT == all ]]; then
    experiment fmnist-small "${FMNIST[@]}" --baseline longer --baseline ensemble
    # the ensemble baseline costs no run (it is the independent arm's); the longer one is measured on the first regime
    experiment fmnist-small-noise20 "${FMNIST[@]}" --set data.label_noise=0.2 --baseline ensemble
    experiment fmnist-small-noise40 "${FMNIST[@]}" --set data.label_noise=0.4 --baseline ensemble
fi

if [[ $WHAT == shakespeare || $WHAT == all ]]; then
    experiment shakespeare-small --config shakespeare_small --seeds 3 \
        --set "data.train=$DATA/tinyshakespeare/input.txt" \
        --arm "independent: loss.alpha=0" --arm "dml_T1:" \
        --arm "ckpt_p100: exchange.mode=checkpoint exchange.period=100"
fi

if [[ $WHAT == cifar || $WHAT == all ]]; then
    experiment cifar10-small --config cifar10_small --seeds 3 \
        --set "data.train=$DATA/cifar10/train.parquet" --set "data.test=$DATA/cifar10/test.parquet" \
        --arm "independent: loss.alpha=0" --arm "dml_T1:" \
        --arm "ckpt_p50: exchange.mode=checkpoint exchange.period=50"
fi

#!/usr/bin/env bash
# A/B training throughput, vlpt vs open_clip, same shapes (tiny-clip), same machine, interleaved rounds.
# Needs the peer venv: ../shared/peers/open_clip/setup.sh /tmp/peer-openclip
# Usage: benchmarks/ab_open_clip.sh [ROUNDS] [BATCH] [MODEL]   -> one RESULT line per run, then medians.
# MODEL: tiny-clip (default) or tiny-coca (vlpt's coca on open_clip's tiny-coca shapes).
# Captions: vlpt gets the peer bench's own caption lengths (4-20 words, padded to the 32-token context;
# throughput.py --peer-captions), and trims the all-padding columns as its training loop does. In bf16 the
# row "vlpt-unpadded" is vlpt on captions that fill the context (nothing to trim, every logit a real token).
# COMPILE=1: in bf16 both trainers also run with torch.compile (rows "open_clip-compiled", "vlpt-compiled").
# VLPT_LEAN="ARGS": in bf16 vlpt also runs with these throughput.py arguments added (row "vlpt-lean"), e.g.
# VLPT_LEAN="--grad-ckpt objectives.captioning.chunk_tokens=340".
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; BATCH=${2:-64}; MODEL=${3:-tiny-clip}
STEPS=(--warmup "${WARMUP:-5}" --steps "${TIMED:-15}")  # untimed, then timed steps of each run (medians)
VLPT=(--recipe clip)
if [ "$MODEL" = tiny-coca ]; then
  VLPT=(--recipe coca model.vision.pool=cls model.decoder.unimodal_depth=4 model.decoder.depth=4
        model.poolers.generative_queries=256 model.poolers.contrastive=cascade objectives.captioning.weight=2)
fi
PEER=${PEER:-/tmp/peer-openclip}
BENCH=$(cd ../shared/peers/open_clip && pwd)/bench.py
JE=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
[ -f "$JE" ] && export LD_PRELOAD=$JE MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true
out=$(mktemp)
peer() {  # ROW [ARGS...]: one open_clip run in precision $prec, its RESULT line recorded under ROW
  local row=$1; shift
  echo "$row $prec $(PYTHONWARNINGS=ignore "$PEER/bin/python" "$BENCH" --model "$MODEL" --batch "$BATCH" "${STEPS[@]}" $amp "$@" | grep RESULT)" | tee -a "$out"
}
ours() {  # ROW [ARGS...]: one vlpt run in precision $prec
  local row=$1; shift
  echo "$row $prec $(.venv/bin/python benchmarks/throughput.py --preset tiny-clip --batch "$BATCH" --precision "$prec" "${STEPS[@]}" "${VLPT[@]}" "$@" | grep RESULT)" | tee -a "$out"
}
caps=--peer-captions
for r in $(seq "$ROUNDS"); do
  for prec in fp32 bf16; do
    amp=""; [ "$prec" = bf16 ] && amp="--amp-bf16"
    peer open_clip
    ours vlpt $caps
    [ "$prec" = bf16 ] && ours vlpt-unpadded
    if [ "${COMPILE:-0}" = 1 ] && [ "$prec" = bf16 ]; then
      peer open_clip-compiled --compile
      ours vlpt-compiled $caps --compile 2>/dev/null
    fi
    if [ -n "${VLPT_LEAN:-}" ] && [ "$prec" = bf16 ]; then
      ours vlpt-lean $caps $VLPT_LEAN
    fi
    if [ "$MODEL" = tiny-clip ]; then  # vlpt with its own 4,096-token vocabulary too
      ours vlpt-bpe4096 $caps --vocab 4096
    fi
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, prec, _, js = line.split(" ", 3)
    r = json.loads(js)
    rows.setdefault((who, prec), []).append((r["samples_per_s"], r.get("peak_rss_MB", r.get("peak_mem_MB"))))
print("\n| trainer | precision | samples/s (median) | runs | peak RSS MB (median) |\n|---|---|---|---|---|")
for (who, prec), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"| {who} | {prec} | {statistics.median(x for x, _ in v):.1f} | {', '.join(f'{x:.1f}' for x, _ in v)} | {statistics.median(m for _, m in v):.0f} |")
PY
